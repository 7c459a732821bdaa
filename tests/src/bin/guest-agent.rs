//! The in-guest agent; see `vmm_tests::agent`.

fn main() -> std::process::ExitCode {
    vmm_tests::agent::cli::main()
}
