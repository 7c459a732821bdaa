//! A digest of what a binary does, not where it was built: for an ELF file, the SHA-256 of
//! its loaded sections (code, read-only and initialised data, relocations), without the
//! debug information (it names the checkout's absolute path) and without the GNU build id
//! (the linker derives it from the whole file, debug information included). The same
//! sources built in two clones of the repository (CI builds a fresh clone each time) or
//! incrementally and from clean give the same digest; any change to code or data gives
//! another. Checked on this project's debug `vmm`: two clones differed only in those parts.
//! Anything that is not a little-endian ELF64 file is hashed whole.

use std::fs;
use std::io;
use std::path::Path;

use sha2::{Digest, Sha256};

const SHF_ALLOC: u64 = 0x2;
const SHT_NOBITS: u32 = 8;
const BUILD_ID: &str = ".note.gnu.build-id";

/// `elf-loaded <hex>` for an ELF64 file, `file <hex>` for anything else.
pub fn digest(path: &Path) -> io::Result<String> {
    let bytes = fs::read(path)?;
    Ok(match loaded_sections(&bytes) {
        Some(sections) => {
            let mut h = Sha256::new();
            for (name, data) in sections {
                h.update((name.len() as u64).to_le_bytes());
                h.update(name);
                h.update((data.len() as u64).to_le_bytes());
                h.update(data);
            }
            format!("elf-loaded {}", hex(&h.finalize()))
        }
        None => format!("file {}", hex(&Sha256::digest(&bytes))),
    })
}

/// The (name, contents) of each section loaded at run time, in file order, but the build
/// id; `None` if `b` is not a well-formed little-endian ELF64 file.
fn loaded_sections(b: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    if b.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    // Every offset comes from the file: checked, so a malformed one means "not ELF".
    let get = |o: usize, n: usize| b.get(o..o.checked_add(n)?);
    let u16_at = |o: usize| Some(u16::from_le_bytes(get(o, 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(get(o, 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(get(o, 8)?.try_into().ok()?));
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let entsize = usize::from(u16_at(0x3a)?);
    let count = usize::from(u16_at(0x3c)?);
    let strndx = usize::from(u16_at(0x3e)?);
    if entsize < 0x40 {
        return None;
    }
    // Section header `i`: (name offset, type, flags, file offset, size).
    let header = |i: usize| {
        let h = shoff.checked_add(i.checked_mul(entsize)?)?;
        get(h, 0x40)?;
        Some((
            usize::try_from(u32_at(h)?).ok()?,
            u32_at(h + 4)?,
            u64_at(h + 8)?,
            usize::try_from(u64_at(h + 0x18)?).ok()?,
            usize::try_from(u64_at(h + 0x20)?).ok()?,
        ))
    };
    let (_, _, _, str_off, str_size) = header(strndx)?;
    let strtab = get(str_off, str_size)?;
    let mut out = Vec::new();
    for i in 0..count {
        let (name_off, kind, flags, off, size) = header(i)?;
        if flags & SHF_ALLOC == 0 || kind == SHT_NOBITS {
            continue;
        }
        let name = strtab.get(name_off..)?;
        let name = &name[..name.iter().position(|&c| c == 0)?];
        if name == BUILD_ID.as_bytes() {
            continue;
        }
        out.push((name, get(off, size)?));
    }
    Some(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::TestDir;

    /// A copy of this test binary (an ELF file with code, data and debug information).
    fn copy_of_self(dir: &TestDir) -> (std::path::PathBuf, Vec<u8>) {
        let bytes = fs::read(std::env::current_exe().unwrap()).unwrap();
        let path = dir.join("bin");
        fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    fn section(bytes: &[u8], wanted: &str) -> (usize, usize) {
        let sections = loaded_sections(bytes).expect("an ELF file");
        let (_, data) = sections
            .iter()
            .find(|(n, _)| *n == wanted.as_bytes())
            .unwrap_or_else(|| panic!("no {wanted}"));
        let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
        (start, data.len())
    }

    #[test]
    fn code_changes_the_digest_debug_info_and_build_id_do_not() {
        let dir = TestDir::new("build-digest").unwrap();
        let (path, bytes) = copy_of_self(&dir);
        let base = digest(&path).unwrap();
        assert!(base.starts_with("elf-loaded "), "{base}");
        assert_ne!(
            base,
            format!("elf-loaded {}", hex(&Sha256::digest(&bytes))),
            "not the whole file's hash"
        );

        // A byte of code.
        let (text, len) = section(&bytes, ".text");
        let mut changed = bytes.clone();
        changed[text + len / 2] ^= 0xff;
        fs::write(&path, &changed).unwrap();
        assert_ne!(digest(&path).unwrap(), base, "a changed .text byte");

        // A byte of the build id, and one of a section that is not loaded.
        let mut changed = bytes.clone();
        let (id, id_len) = section_any(&bytes, BUILD_ID);
        changed[id + id_len - 1] ^= 0xff;
        let (debug, debug_len) = section_any(&bytes, ".debug_str");
        changed[debug + debug_len / 2] ^= 0xff;
        fs::write(&path, &changed).unwrap();
        assert_eq!(
            digest(&path).unwrap(),
            base,
            "build id and debug info ignored"
        );
    }

    /// Any section, loaded or not.
    fn section_any(b: &[u8], wanted: &str) -> (usize, usize) {
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) as usize;
        let (shoff, entsize, count) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c));
        let str_h = shoff + u16_at(0x3e) * entsize;
        let strtab = u64_at(str_h + 0x18);
        for i in 0..count {
            let h = shoff + i * entsize;
            let name = &b[strtab + u32_at(h)..];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap()];
            if name == wanted.as_bytes() {
                return (u64_at(h + 0x18), u64_at(h + 0x20));
            }
        }
        panic!("no section {wanted}");
    }

    #[test]
    fn other_files_and_garbage_are_hashed_whole() {
        let dir = TestDir::new("build-digest").unwrap();
        for (name, bytes) in [
            ("text", b"not an elf file".to_vec()),
            ("short-elf", b"\x7fELF\x02\x01\x01".to_vec()),
            ("elf32", b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0".to_vec()),
        ] {
            let path = dir.join(name);
            fs::write(&path, &bytes).unwrap();
            assert_eq!(
                digest(&path).unwrap(),
                format!("file {}", hex(&Sha256::digest(&bytes))),
                "{name}"
            );
        }
        // A header whose section table points past the end: hashed whole, no panic.
        let mut bogus = vec![0u8; 0x40];
        bogus[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bogus[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        bogus[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        bogus[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        let path = dir.join("bogus");
        fs::write(&path, &bogus).unwrap();
        assert!(digest(&path).unwrap().starts_with("file "));
    }
}
