use std::process::ExitCode;

fn main() -> ExitCode {
    fleet::app::main(&user_change_publisher::SPEC, user_change_publisher::run)
}
