use std::process::ExitCode;

fn main() -> ExitCode {
    fleet::app::main(&order_cacher::SPEC, order_cacher::run)
}
