//! Device migration as the VMM sees it: one interface for every source of device state.
