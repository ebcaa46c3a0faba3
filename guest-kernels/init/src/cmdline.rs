//! What the VMM tells init on the kernel command line (/proc/cmdline), in words the kernel's
//! parser passes through untouched:
//!
//! - `gridinit.env=KEY=VALUE`: one variable of the entrypoint's environment;
//! - `gridinit.root=TAG`: the virtio-fs tag to mount as the root (see `rootfs`);
//! - `gridinit.grace=SECS`: on a graceful shutdown, the entrypoint's time between SIGTERM and
//!   SIGKILL (see `shutdown`);
//! - every word after the first standalone `--`: the entrypoint's argv.
//!
//! Values and argv words are percent-encoded by the VMM: `%XX` stands for the byte XX, so
//! spaces, double quotes, `%` and control characters survive the kernel's parser; the lone
//! word `%00` is the empty string. Reading /proc/cmdline instead of init's own argv keeps
//! kernel arguments that the kernel did not recognise (and hands to init) out of the
//! entrypoint.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

const ENV_PREFIX: &str = "gridinit.env=";
const ROOT_PREFIX: &str = "gridinit.root=";
const GRACE_PREFIX: &str = "gridinit.grace=";
const MOUNT_PREFIX: &str = "gridinit.mount=";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct BootArgs {
    pub entrypoint: Vec<OsString>,
    pub env: Vec<(OsString, OsString)>,
    pub root: Option<String>,
    pub grace_secs: Option<u32>,
    /// `gridinit.mount=TAG:PATH`: shares to mount (in order) once the root is in place.
    pub mounts: Vec<(String, OsString)>,
}

/// Splits a command line into words; double quotes group words (and are kept out).
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_ascii_whitespace() && !in_quotes => {
                if started {
                    out.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(current);
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes; a malformed escape is kept as written.
pub fn decode(word: &str) -> OsString {
    if word == "%00" {
        return OsString::new();
    }
    let bytes = word.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Parses a kernel command line.
pub fn parse(cmdline: &str) -> BootArgs {
    let mut args = BootArgs::default();
    let all = words(cmdline);
    let split = all.iter().position(|w| w == "--").unwrap_or(all.len());
    for word in &all[..split] {
        if let Some(assignment) = word.strip_prefix(ENV_PREFIX) {
            if let Some((key, value)) = assignment.split_once('=') {
                if !key.is_empty() {
                    args.env.push((OsString::from(key), decode(value)));
                }
            }
        } else if let Some(mount) = word.strip_prefix(MOUNT_PREFIX) {
            if let Some((tag, path)) = mount.split_once(':') {
                if !tag.is_empty() && path.starts_with('/') {
                    args.mounts.push((tag.to_string(), decode(path)));
                }
            }
        } else if let Some(secs) = word.strip_prefix(GRACE_PREFIX) {
            args.grace_secs = secs.parse().ok();
        } else if let Some(tag) = word.strip_prefix(ROOT_PREFIX) {
            if !tag.is_empty() {
                args.root = Some(tag.to_string());
            }
        }
    }
    args.entrypoint = all.iter().skip(split + 1).map(|w| decode(w)).collect();
    args
}

/// Reads and parses /proc/cmdline.
pub fn read() -> std::io::Result<BootArgs> {
    let text = std::fs::read_to_string("/proc/cmdline")?;
    Ok(parse(text.trim_end()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_env_and_root() {
        let a = parse(
            "console=ttyS0 nomodules pci=off gridinit.env=GREETING=hello%20there gridinit.root=rootfs \
             -- /bin/sh -c echo%20%22hi%22%3B%20exit%207 %00",
        );
        assert_eq!(
            a.entrypoint,
            vec![
                OsString::from("/bin/sh"),
                "-c".into(),
                "echo \"hi\"; exit 7".into(),
                "".into()
            ]
        );
        assert_eq!(a.env, vec![("GREETING".into(), "hello there".into())]);
        assert_eq!(a.root.as_deref(), Some("rootfs"));
    }

    #[test]
    fn grace_period() {
        assert_eq!(parse("gridinit.grace=30 -- x").grace_secs, Some(30));
        assert_eq!(parse("gridinit.grace=-1").grace_secs, None);
        assert_eq!(parse("-- gridinit.grace=30").grace_secs, None);
    }

    #[test]
    fn no_separator_means_no_entrypoint() {
        let a = parse("console=ttyS0 nomodules");
        assert!(a.entrypoint.is_empty());
    }

    #[test]
    fn quotes_group_words_and_malformed_escapes_stay() {
        let a = parse("x=\"a -- b\" -- 100% %zz %4");
        assert_eq!(
            a.entrypoint,
            vec![OsString::from("100%"), "%zz".into(), "%4".into()]
        );
    }

    #[test]
    fn share_mounts() {
        let args = parse("gridinit.mount=vol0:/data%20x gridinit.mount=bad gridinit.mount=t:rel -- gridinit.mount=a:/b");
        assert_eq!(
            args.mounts,
            vec![("vol0".to_string(), OsString::from("/data x"))]
        );
    }
}
