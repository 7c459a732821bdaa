//! The `--serial` / `--serial2` option: where a serial port's bytes go.

use std::path::PathBuf;
use std::str::FromStr;

/// Where a serial port is connected on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialConfig {
    /// Not connected: guest output is dropped, no input.
    Off,
    /// The VMM's standard input and output.
    Stdio,
    /// Guest output is appended to a file; no input.
    File(PathBuf),
    /// A Unix socket the VMM listens on; the connected client is the other end.
    Socket(PathBuf),
}

/// A `--serial` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid serial mode '{0}': use stdio, off, file=PATH or socket=PATH")]
pub struct SerialConfigError(String);

impl FromStr for SerialConfig {
    type Err = SerialConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let path = |p: &str| {
            if p.is_empty() {
                Err(SerialConfigError(s.to_string()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once('=') {
            None if s == "off" => Ok(SerialConfig::Off),
            None if s == "stdio" => Ok(SerialConfig::Stdio),
            Some(("file", p)) => Ok(SerialConfig::File(path(p)?)),
            Some(("socket", p)) => Ok(SerialConfig::Socket(path(p)?)),
            _ => Err(SerialConfigError(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_and_rejects_the_rest() {
        assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
        assert_eq!(
            "stdio".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdio
        );
        assert_eq!(
            "file=/tmp/x".parse::<SerialConfig>().unwrap(),
            SerialConfig::File("/tmp/x".into())
        );
        assert_eq!(
            "socket=a.sock".parse::<SerialConfig>().unwrap(),
            SerialConfig::Socket("a.sock".into())
        );
        for bad in ["", "file=", "tty", "socket", "pipe=/x", "stdio=1"] {
            let e = bad.parse::<SerialConfig>().unwrap_err();
            assert!(
                e.to_string()
                    .contains("stdio, off, file=PATH or socket=PATH"),
                "{bad}: {e}"
            );
        }
    }
}
