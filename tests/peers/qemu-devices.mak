# QEMU devices for the vfio-user server peer (tests/peers/build.sh copies this file to
# configs/devices/x86_64-softmmu/vmm-peers.mak and configures with
# --without-default-devices --with-devices-x86_64=vmm-peers): the x-remote machine, its
# vfio-user server object, virtio-blk-pci and virtio-net-pci (whose `-netdev tap` backend is
# not a device: net/tap*.c are built on every POSIX host). Kconfig adds what these select.
CONFIG_PCI_EXPRESS=y
CONFIG_MULTIPROCESS=y
CONFIG_VFIO_USER_SERVER=y
CONFIG_VIRTIO_PCI=y
CONFIG_VIRTIO_BLK=y
CONFIG_VIRTIO_NET=y
