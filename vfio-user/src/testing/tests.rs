//! Tests of the fake itself, for what the crate's tests that use it do not reach: a
//! fault on any command, the two ways of taking migration arcs, and region access rules.

use std::time::Duration;

use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

use super::*;
use crate::proto::{Command, MigState};
use crate::{Client, ClientError, Device, Errno};

const TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn any_command_can_close_the_connection_after_n_messages() {
    let device = FakeDevice::builder().build().unwrap();
    let (ours, server) = FakeServer::builder(device)
        .fault(Fault::any().nth(2).silent().then_close())
        .pair()
        .unwrap();
    let client = Client::from_stream(ours, TIMEOUT).unwrap();
    assert_eq!(client.device_info().unwrap().num_regions, 9);
    assert!(matches!(
        client.reset(),
        Err(ClientError::Disconnected {
            command: Command::DeviceReset
        })
    ));
    server.finish(TIMEOUT).unwrap();
    assert_eq!(
        server.sequence(),
        ["Version", "DeviceGetInfo", "DeviceReset"]
    );
    assert_eq!(
        server.probe().lock().resets,
        1,
        "the device saw it all the same"
    );
}

#[test]
fn walking_takes_any_allowed_transition_and_direct_arcs_only_single_ones() {
    use MigState::*;
    let stop_copy = u64::from(VFIO_MIGRATION_STOP_COPY);
    let with_pre_copy = stop_copy | u64::from(VFIO_MIGRATION_PRE_COPY);
    let walk = Migration::new(stop_copy);
    let direct = Migration::new(with_pre_copy).direct_arcs_only();
    let mut data = MigrationData::default();
    assert_eq!(data.set_state(&walk, StopCopy), Ok(()));
    assert_eq!(data.set_state(&walk, PreCopy), Err(Errno(libc::EINVAL)));
    assert_eq!(data.set_state(&walk, Resuming), Ok(()));
    assert_eq!(data.set_state(&walk, Error), Err(Errno(libc::EINVAL)));
    data.refuse_to_leave = Some(Resuming);
    assert_eq!(data.set_state(&walk, Running), Err(Errno(libc::EINVAL)));
    assert_eq!(data.state, Resuming);

    let mut data = MigrationData::default();
    assert_eq!(data.set_state(&direct, StopCopy), Err(Errno(libc::EINVAL)));
    assert_eq!(data.set_state(&direct, PreCopy), Ok(()));
    assert_eq!(data.set_state(&direct, StopCopy), Ok(()));
    assert_eq!(data.set_state(&direct, Running), Err(Errno(libc::EINVAL)));
}

#[test]
fn regions_refuse_what_is_out_of_reach_or_read_only() {
    let registers = Region::new(0x100)
        .accessible(0x10)
        .fill(0xff)
        .contents(4, &[1, 2])
        .read_only(4..6)
        .record_writes();
    let mut dev = FakeDevice::builder().region(0, registers).build().unwrap();
    let mut b = [0u8; 4];
    dev.region_read(0, 2, &mut b).unwrap();
    assert_eq!(b, [0xff, 0xff, 1, 2]);
    assert_eq!(dev.region_read(0, 0xe, &mut b), Err(Errno(libc::EINVAL)));
    assert_eq!(dev.region_write(0, 5, &[0]), Err(Errno(libc::EINVAL)));
    dev.region_write(0, 8, &[7]).unwrap();
    dev.reset().unwrap();
    dev.region_read(0, 8, &mut b[..1]).unwrap();
    assert_eq!(b[0], 0xff, "registers are back to their initial contents");
    let writes = dev.probe().lock().region_writes.len();
    assert_eq!(writes, 2, "refused writes are recorded too");
    // Regions below the count exist, empty; beyond it only described ones do.
    assert_eq!(dev.region_info(8).unwrap().size, 0);
    assert!(dev.region_info(9).is_err());
}
