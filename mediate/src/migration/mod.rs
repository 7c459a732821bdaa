//! The migration region: layout, protocol helper and the VMM-side reader.
