//! The traffic peer of the NIC tests; see `vmm_tests::agent::net_peer`.

fn main() -> std::process::ExitCode {
    vmm_tests::agent::net_peer::main(std::env::args().skip(1))
}
