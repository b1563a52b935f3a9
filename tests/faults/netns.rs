//! A throwaway network namespace joined to this machine by veth links, for partitions: a link taken down drops every
//! packet on it, as a cut cable or a dead switch port would (no resets, nothing refused: the peer hears nothing).
//! Needs root and `ip` (iproute2). Everything it creates is removed on drop.

use std::process::Command;

pub struct Netns {
    pub name: String,
    /// Host-side ends of the veth links (deleting one deletes its peer).
    host_ends: Vec<String>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Netns {
    /// A namespace named `engram-{tag}-{pid}`, or why it cannot be made here (not root, no iproute2).
    pub fn create(tag: &str) -> Result<Self, String> {
        let name = format!("engram-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let me = Self { name, host_ends: Vec::new() };
        me.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(me)
    }

    /// A veth link: `host_ip`/30 on this side, `ns_ip`/30 inside the namespace. Interface names come from `short`
    /// (at most 6 characters) and this process's id, so concurrent runs do not collide.
    pub fn link(&mut self, short: &str, host_ip: &str, ns_ip: &str) -> Result<(), String> {
        let n = std::process::id() % 100_000;
        let (host, inner) = (format!("{short}{n}h"), format!("{short}{n}n"));
        ip(&["link", "add", &host, "type", "veth", "peer", "name", &inner])?;
        self.host_ends.push(host.clone());
        ip(&["link", "set", &inner, "netns", &self.name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host])?;
        ip(&["link", "set", &host, "up"])?;
        self.exec(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &inner])?;
        self.exec(&["ip", "link", "set", &inner, "up"])?;
        Ok(())
    }

    /// Takes the link made by `link(short, ..)` down (partition) or up (heal).
    pub fn set_link(&self, short: &str, up: bool) {
        let host = format!("{short}{}h", std::process::id() % 100_000);
        ip(&["link", "set", &host, if up { "up" } else { "down" }]).unwrap();
    }

    /// The prefix that runs a program inside the namespace (`ip netns exec` execs it in place).
    pub fn wrapper(&self) -> Vec<&str> {
        vec!["ip", "netns", "exec", self.name.as_str()]
    }

    fn exec(&self, args: &[&str]) -> Result<(), String> {
        ip(&[&["netns", "exec", &self.name][..], args].concat())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for h in &self.host_ends {
            let _ = ip(&["link", "del", h]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}
