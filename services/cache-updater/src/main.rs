use std::process::ExitCode;

fn main() -> ExitCode {
    fleet::app::main(&cache_updater::SPEC, cache_updater::run)
}
