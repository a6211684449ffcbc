use std::process::ExitCode;

fn main() -> ExitCode {
    fleet::app::main(&counter_flusher::SPEC, counter_flusher::run)
}
