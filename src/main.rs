//! The `cps3d` command line.

mod cli;

fn main() -> std::process::ExitCode {
    // Test builds arm fault-injection points from the FAILPOINTS variable; normal builds
    // have none.
    let _faults = fail::has_failpoints().then(fail::FailScenario::setup);
    // Refused settings only cost speed.
    let _accepted = cps3d::util::keep_freed_memory();
    cli::run()
}
