//! Hosts in network namespaces joined by one bridge (itself in a namespace of its own, so
//! nothing touches the machine's real network), with optional shaping of each host's upload
//! (tbf on its interface) and download (tbf on an ifb device its ingress is redirected to).
//! Needs root, `ip` and `tc` (iproute2). Used by the multi-process tests and by
//! `colony bench allreduce`.

use std::process::Command;

use anyhow::{Context, bail};

/// A set of namespaced hosts on `10.<net>.0.0/24`, torn down on drop.
#[derive(Debug)]
pub struct NetLab {
    pub prefix: String,
    switch: String,
    pub hosts: Vec<Host>,
    net: u8,
}

#[derive(Debug, Clone)]
pub struct Host {
    /// The namespace name.
    pub ns: String,
    pub ip: String,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("cannot run `{cmd}` (install iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run("ip", args)
}

fn tc(args: &[&str]) -> anyhow::Result<()> {
    run("tc", args)
}

/// A token bucket for `rate` bits per second: a burst of at least one 10 ms tick at that rate
/// (the kernel's timer granularity) and a queue of 50 ms, so TCP and QUIC see a real
/// bottleneck rather than drops at every burst.
fn tbf_args(rate_bps: u64) -> [String; 6] {
    let burst = (rate_bps / 8 / 100).max(16 * 1024);
    [
        "rate".into(),
        format!("{rate_bps}bit"),
        "burst".into(),
        format!("{burst}b"),
        "latency".into(),
        "50ms".into(),
    ]
}

impl NetLab {
    /// Creates `n` hosts named `<prefix>-h<i>` with addresses `10.<net>.0.<i+1>`.
    pub fn new(prefix: &str, net: u8, n: usize) -> anyhow::Result<Self> {
        let switch = format!("{prefix}-sw");
        let mut lab = Self {
            prefix: prefix.to_owned(),
            switch: switch.clone(),
            hosts: Vec::new(),
            net,
        };
        lab.cleanup();
        ip(&["netns", "add", &switch])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{prefix}-h{i}");
            let host_ip = format!("10.{net}.0.{}", i + 1);
            ip(&["netns", "add", &ns])?;
            let (a, b) = (format!("{prefix}{i}a"), format!("{prefix}{i}b"));
            ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
            ip(&["link", "set", &a, "netns", &ns])?;
            ip(&["link", "set", &b, "netns", &switch])?;
            ip(&["-n", &ns, "link", "set", &a, "name", "eth0"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{host_ip}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &switch, "link", "set", &b, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &b, "up"])?;
            lab.hosts.push(Host { ns, ip: host_ip });
        }
        Ok(lab)
    }

    /// Cuts host `i` off the bridge (a partition) or reconnects it.
    pub fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let b = format!("{}{i}b", self.prefix);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &b,
            if up { "up" } else { "down" },
        ])
    }

    /// Makes host `from` unable to send anything to host `to` (a route that prohibits it),
    /// as a NAT or firewall between them would.
    pub fn block(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let target = format!("{}/32", self.hosts[to].ip);
        ip(&[
            "-n",
            &self.hosts[from].ns,
            "route",
            "add",
            "prohibit",
            &target,
        ])
    }

    /// Undoes [`Self::block`].
    pub fn unblock(&self, from: usize, to: usize) -> anyhow::Result<()> {
        let target = format!("{}/32", self.hosts[to].ip);
        ip(&[
            "-n",
            &self.hosts[from].ns,
            "route",
            "del",
            "prohibit",
            &target,
        ])
    }

    /// Splits the hosts in two: nothing passes between a host of `a` and a host of `b`, either
    /// way (each host still reaches its own side).
    pub fn partition(&self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        for &i in a {
            for &j in b {
                self.block(i, j)?;
                self.block(j, i)?;
            }
        }
        Ok(())
    }

    /// Undoes [`Self::partition`] with the same sides.
    pub fn heal(&self, a: &[usize], b: &[usize]) -> anyhow::Result<()> {
        for &i in a {
            for &j in b {
                self.unblock(i, j)?;
                self.unblock(j, i)?;
            }
        }
        Ok(())
    }

    /// Limits host `i`'s upload and download to the given bits per second.
    pub fn shape(&self, i: usize, up_bps: u64, down_bps: u64) -> anyhow::Result<()> {
        let ns = self.hosts[i].ns.as_str();
        let up = tbf_args(up_bps);
        let up: Vec<&str> = up.iter().map(String::as_str).collect();
        tc(&[
            &["-n", ns, "qdisc", "replace", "dev", "eth0", "root", "tbf"],
            &up[..],
        ]
        .concat())?;
        // Ingress cannot be queued, so it is redirected to an ifb device and shaped there.
        let _ = ip(&["-n", ns, "link", "add", "ifb0", "type", "ifb"]);
        ip(&["-n", ns, "link", "set", "ifb0", "up"])?;
        let _ = tc(&["-n", ns, "qdisc", "del", "dev", "eth0", "ingress"]);
        tc(&[
            "-n", ns, "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress",
        ])?;
        tc(&[
            "-n", ns, "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32",
            "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb0",
        ])?;
        let down = tbf_args(down_bps);
        let down: Vec<&str> = down.iter().map(String::as_str).collect();
        tc(&[
            &["-n", ns, "qdisc", "replace", "dev", "ifb0", "root", "tbf"],
            &down[..],
        ]
        .concat())
    }

    pub fn net(&self) -> u8 {
        self.net
    }

    fn cleanup(&self) {
        let list = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        for line in String::from_utf8_lossy(&list).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if name.starts_with(&format!("{}-", self.prefix)) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Whether this process may create namespaces (root with `ip`).
pub fn available() -> bool {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .is_ok_and(|o| o.status.success())
        && std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
}
