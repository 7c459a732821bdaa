//! Diagnostics for error messages: the last lines of a VM's log files.

use std::fs;
use std::path::Path;

/// Lines of each log quoted in error messages.
pub const TAIL_LINES: usize = 30;

/// The last `n` lines of the file at `path` (lossy UTF-8), or a note saying why there are none.
pub fn tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Err(e) => format!("(cannot read {}: {e})", path.display()),
        Ok(bytes) if bytes.is_empty() => "(empty)".to_owned(),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(n);
            let mut out = String::new();
            if skip > 0 {
                out.push_str(&format!("({skip} earlier lines omitted)\n"));
            }
            out.push_str(&lines[skip..].join("\n"));
            out
        }
    }
}

/// A titled block quoting the tail of a file, for appending to an error message.
pub fn section(title: &str, path: &Path) -> String {
    format!(
        "\n--- {title} ({}) ---\n{}",
        path.display(),
        tail(path, TAIL_LINES)
    )
}

/// Each thread of process `pid`: its name, state, where the kernel has it waiting
/// (`wchan`) and its kernel stack (root only), for the message of a test that found the
/// process stuck.
pub fn threads(pid: u32) -> String {
    let dir = format!("/proc/{pid}/task");
    let Ok(tasks) = fs::read_dir(&dir) else {
        return format!("(no {dir})");
    };
    let mut out = String::new();
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| fs::read_to_string(p.join(f)).unwrap_or_default();
        let state = read("status")
            .lines()
            .find(|l| l.starts_with("State:"))
            .unwrap_or_default()
            .to_owned();
        out.push_str(&format!(
            "\n{} {} ({state}) wchan {}\n{}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim(),
            read("stack").trim_end()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails() {
        let dir = std::env::temp_dir().join(format!("vmm-diag-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("log");
        fs::write(&f, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&f, 2), "(1 earlier lines omitted)\nb\nc");
        assert_eq!(tail(&f, 5), "a\nb\nc");
        fs::write(&f, "").unwrap();
        assert_eq!(tail(&f, 5), "(empty)");
        assert!(tail(&dir.join("none"), 5).starts_with("(cannot read"));
        assert!(section("console", &f).contains("--- console"));
        let _ = fs::remove_dir_all(&dir);
    }
}
