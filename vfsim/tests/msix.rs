//! MSI-X as strict as hardware, over a real socket: no signal while MSI-X is disabled,
//! the function is masked or the vector is masked; the pending bit is set instead, and
//! the vector is signalled when it becomes unmasked.

mod common;

use std::time::Duration;

use common::*;
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfsim::blk::*;
use vfsim::layout::*;
use vfsim::mmap::memfd;

/// Long enough for a signal the device sent to be seen.
const IRQ_WAIT: Duration = Duration::from_secs(5);
/// How long a signal that must not come is waited for, once the request is complete
/// (the device signals in the same pass that publishes the used entry).
const NO_IRQ_WAIT: Duration = Duration::from_millis(300);
/// The queue's vector (see [`Driver::init`]).
const QUEUE_VECTOR: usize = 1;

/// A driver with MSI-X as the device has it after reset (disabled, every vector masked),
/// the queue initialised.
fn masked_driver(server: &Server) -> Driver {
    let mut d = Driver::connect_masked(&server.socket, memfd(c"guest", GUEST_SIZE).unwrap());
    d.init();
    d
}

/// Completes one flush request; the device has decided about its interrupt on return.
fn complete_one(d: &mut Driver) {
    let (status, _) = d.request(VIRTIO_BLK_T_FLUSH, 0, None, Doorbell::Trapped);
    assert_eq!(status, VIRTIO_BLK_S_OK);
}

fn pba(d: &Driver) -> u64 {
    d.bar_read(MSIX_PBA_OFFSET, 8)
}

fn signalled(d: &Driver, wait: Duration) -> bool {
    wait_eventfd(&d.irqs[QUEUE_VECTOR], wait).is_some()
}

#[test]
fn no_signal_while_msix_is_disabled_then_sent_on_enable() {
    let server = start_server();
    let mut d = masked_driver(&server);
    d.mask_vectors(0, 2, false);
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT), "MSI-X is disabled");
    assert_eq!(pba(&d), 1 << QUEUE_VECTOR, "pending instead");
    d.msix_control(MSIX_ENABLE);
    assert!(signalled(&d, IRQ_WAIT), "sent when MSI-X is enabled");
    assert_eq!(pba(&d), 0, "sending clears the pending bit");
    complete_one(&mut d);
    assert!(
        signalled(&d, IRQ_WAIT),
        "enabled and unmasked: signalled at once"
    );
}

#[test]
fn no_signal_while_the_function_is_masked_then_sent_on_function_unmask() {
    let server = start_server();
    let mut d = masked_driver(&server);
    d.mask_vectors(0, 2, false);
    d.msix_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT), "the function is masked");
    assert_eq!(pba(&d), 1 << QUEUE_VECTOR);
    // The control word reads back as written.
    let mut c = [0u8; 2];
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, CAP_MSIX as u64 + 2, &mut c)
        .unwrap();
    assert_eq!(u16::from_le_bytes(c), MSIX_ENABLE | MSIX_FUNCTION_MASK | 1);
    d.msix_control(MSIX_ENABLE);
    assert!(
        signalled(&d, IRQ_WAIT),
        "sent when the function is unmasked"
    );
    assert_eq!(pba(&d), 0);
}

#[test]
fn no_signal_while_the_vector_is_masked_then_sent_on_unmask_either_way() {
    let server = start_server();
    let mut d = masked_driver(&server);
    d.msix_control(MSIX_ENABLE);
    // After reset every vector is masked, in the table too.
    let control = MSIX_TABLE_OFFSET + 16 * QUEUE_VECTOR as u64 + 12;
    assert_eq!(d.bar_read(control, 4), 1);
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT), "the vector is masked");
    assert_eq!(pba(&d), 1 << QUEUE_VECTOR);
    // Unmasked with SET_IRQS: sent, and the table's mask bit follows.
    d.mask_vectors(QUEUE_VECTOR as u32, 1, false);
    assert!(signalled(&d, IRQ_WAIT), "sent on SET_IRQS unmask");
    assert_eq!((pba(&d), d.bar_read(control, 4)), (0, 0));
    // Masked with SET_IRQS, unmasked through the table.
    d.mask_vectors(QUEUE_VECTOR as u32, 1, true);
    assert_eq!(d.bar_read(control, 4), 1);
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT), "masked by SET_IRQS");
    assert_eq!(pba(&d), 1 << QUEUE_VECTOR);
    d.bar_write(control, &0u32.to_le_bytes());
    assert!(signalled(&d, IRQ_WAIT), "sent on unmask through the table");
    assert_eq!(pba(&d), 0);
    // Masked through the table (a qword write of data and control), unmasked by SET_IRQS.
    d.bar_write(control - 4, &(0x4022u64 | 1 << 32).to_le_bytes());
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT), "masked through the table");
    d.mask_vectors(QUEUE_VECTOR as u32, 1, false);
    assert!(signalled(&d, IRQ_WAIT));
    // The other vector was never touched by any of it.
    assert!(wait_eventfd(&d.irqs[0], NO_IRQ_WAIT).is_none());
    assert_eq!(d.bar_read(MSIX_TABLE_OFFSET + 12, 4), 1);
}

#[test]
fn reset_disables_msix_masks_every_vector_and_drops_pending() {
    let server = start_server();
    let mut d = masked_driver(&server);
    complete_one(&mut d);
    assert_eq!(pba(&d), 1 << QUEUE_VECTOR);
    d.msix_control(MSIX_ENABLE);
    d.mask_vectors(0, 2, false);
    assert!(signalled(&d, IRQ_WAIT));
    d.client.reset().unwrap();
    let mut c = [0u8; 2];
    d.client
        .region_read(VFIO_PCI_CONFIG_REGION_INDEX, CAP_MSIX as u64 + 2, &mut c)
        .unwrap();
    assert_eq!(u16::from_le_bytes(c), 1, "disabled after reset");
    assert_eq!(
        d.bar_read(MSIX_TABLE_OFFSET + 16 + 12, 4),
        1,
        "masked after reset"
    );
    d.init();
    complete_one(&mut d);
    assert!(!signalled(&d, NO_IRQ_WAIT));
    // Out-of-range mask requests are refused.
    let e = d
        .client
        .set_irqs(
            vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX,
            vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_NONE
                | vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_UNMASK,
            1,
            2,
            &[],
        )
        .unwrap_err();
    assert!(
        matches!(e, vfio_user::ClientError::Remote { errno, .. } if errno == libc::EINVAL),
        "{e}"
    );
}
