//! The traffic peer of the NIC tests; see `vmm_tests::harness::net_peer`.

fn main() -> std::process::ExitCode {
    vmm_tests::harness::net_peer::main()
}
