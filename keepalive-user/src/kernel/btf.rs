//! Resolves the kernel struct offsets the eBPF programs need from the
//! running kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! rustc emits no CO-RE relocations, so instead of baking offsets for one
//! kernel build we look every field up here at start-up and hand them to the
//! programs in [`keepalive_common::Offsets`].

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use btf_rs::{Btf, Type};
use keepalive_common::{Offsets, SnapOffsets, TuneOffsets};

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The kernel's type information.
pub struct KernelBtf {
    btf: Btf,
    /// Structs looked up so far: each lookup by name scans every type.
    structs: std::cell::RefCell<std::collections::HashMap<String, btf_rs::Struct>>,
}

/// Where a field sits inside its struct, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

impl KernelBtf {
    pub fn load() -> Result<Self> {
        Self::from_path(Path::new(VMLINUX_BTF))
    }

    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "{} not found: this kernel has no BTF; use a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                path.display()
            );
        }
        // Mmap: parse lazily. We look up a few dozen types once; parsing
        // all of vmlinux's BTF up front costs ~100 ms.
        let btf = Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
            .with_context(|| format!("cannot parse kernel BTF {}", path.display()))?;
        Ok(Self {
            btf,
            structs: Default::default(),
        })
    }

    /// The struct or union named `name`.
    fn find_struct(&self, name: &str) -> Result<btf_rs::Struct> {
        if let Some(s) = self.structs.borrow().get(name) {
            return Ok(s.clone());
        }
        let s = self.find_struct_uncached(name)?;
        self.structs
            .borrow_mut()
            .insert(name.to_string(), s.clone());
        Ok(s)
    }

    fn find_struct_uncached(&self, name: &str) -> Result<btf_rs::Struct> {
        let types = self
            .btf
            .resolve_types_by_name(name)
            .map_err(|_| anyhow!("kernel BTF has no type `{name}`"))?;
        types
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
            .ok_or_else(|| anyhow!("kernel BTF has no struct `{name}`"))
    }

    /// Follows typedefs and qualifiers to the underlying type.
    fn strip(&self, mut t: Type) -> Result<Type> {
        loop {
            match t {
                Type::Typedef(_)
                | Type::Volatile(_)
                | Type::Const(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    t = self.btf.resolve_chained_type(t.as_btf_type().unwrap())?;
                }
                other => return Ok(other),
            }
        }
    }

    fn size_of(&self, t: &Type) -> Result<usize> {
        Ok(match self.strip(t.clone())? {
            Type::Int(i) => i.size(),
            Type::Ptr(_) => 8,
            Type::Struct(s) | Type::Union(s) => s.size(),
            Type::Enum(e) => e.size(),
            Type::Enum64(e) => e.size(),
            Type::Array(a) => {
                let elem = self.btf.resolve_chained_type(&a)?;
                a.len() * self.size_of(&elem)?
            }
            other => bail!("cannot size BTF type {}", other.name()),
        })
    }

    /// Finds `name` among the members of `s`, looking through anonymous
    /// structs and unions. Returns the bit offset and the member's type.
    fn member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<(u32, Type)>> {
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let mtype = self.btf.resolve_chained_type(m)?;
            if mname == name {
                return Ok(Some((m.bit_offset(), mtype)));
            }
            if mname.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(mtype)?
                && let Some((off, t)) = self.member(&inner, name)?
            {
                return Ok(Some((m.bit_offset() + off, t)));
            }
        }
        Ok(None)
    }

    /// Byte offset and size of `path` (`a.b.c`) inside struct `root`.
    pub fn field(&self, root: &str, path: &str) -> Result<Field> {
        let mut s = self.find_struct(root)?;
        let mut bits = 0u32;
        let parts: Vec<&str> = path.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let (off, t) = self
                .member(&s, part)?
                .ok_or_else(|| anyhow!("kernel struct `{root}` has no field `{path}`"))?;
            bits += off;
            if i + 1 == parts.len() {
                if !bits.is_multiple_of(8) {
                    bail!("`{root}.{path}` is a bitfield; this kernel is not supported");
                }
                return Ok(Field {
                    offset: (bits / 8) as usize,
                    size: self.size_of(&t)?,
                });
            }
            s = match self.strip(t)? {
                Type::Struct(inner) | Type::Union(inner) => inner,
                _ => bail!("`{root}.{path}`: `{part}` is not a struct"),
            };
        }
        unreachable!("split yields at least one part")
    }

    /// Number of arguments a BTF-enabled tracepoint passes (without the context).
    pub fn tracepoint_args(&self, tp: &str) -> Result<usize> {
        let name = format!("btf_trace_{tp}");
        let t = self
            .btf
            .resolve_types_by_name(&name)
            .map_err(|_| anyhow!("kernel has no tracepoint `{tp}` in BTF"))?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("kernel has no tracepoint `{tp}` in BTF"))?;
        let mut t = self.strip(t)?;
        if let Type::Ptr(p) = &t {
            t = self.strip(self.btf.resolve_chained_type(p)?)?;
        }
        match t {
            Type::FuncProto(fp) => Ok(fp.parameters.len().saturating_sub(1)),
            other => bail!("btf_trace_{tp} is a {}, not a function", other.name()),
        }
    }

    /// Every offset the programs need. Fails naming the first missing field.
    pub fn offsets(&self) -> Result<Offsets> {
        let off = |root: &str, path: &str| -> Result<u16> {
            let f = self.field(root, path)?;
            u16::try_from(f.offset).with_context(|| format!("{root}.{path} offset too large"))
        };
        let protocol = self.field("sock", "sk_protocol")?;
        // The SYN-ACK hook reads a request socket's tuple and cookie with
        // the `sock` offsets: both start with their `sock_common`.
        let req_common = self.field("request_sock", "__req_common")?.offset;
        if req_common != 0 {
            bail!(
                "kernel struct `request_sock` does not start with its `sock_common` (at {req_common}); this kernel is not supported"
            );
        }
        Ok(Offsets {
            skc_daddr: off("sock_common", "skc_daddr")?,
            skc_rcv_saddr: off("sock_common", "skc_rcv_saddr")?,
            skc_dport: off("sock_common", "skc_dport")?,
            skc_num: off("sock_common", "skc_num")?,
            skc_family: off("sock_common", "skc_family")?,
            skc_state: off("sock_common", "skc_state")?,
            skc_v6_daddr: off("sock_common", "skc_v6_daddr")?,
            skc_v6_rcv_saddr: off("sock_common", "skc_v6_rcv_saddr")?,
            skc_net: off("sock_common", "skc_net")?,
            skc_cookie: off("sock_common", "skc_cookie")?,
            sk_protocol: protocol.offset as u16,
            sk_protocol_size: protocol.size as u16,
            sk_err: off("sock", "sk_err")?,
            sk_timer: off("sock", "sk_timer")?,
            icsk_probes_out: off("inet_connection_sock", "icsk_probes_out")?,
            icsk_user_timeout: off("inet_connection_sock", "icsk_user_timeout")?,
            icsk_retransmit_timer: off("inet_connection_sock", "icsk_retransmit_timer")?,
            net_ns_inum: off("net", "ns.inum")?,
            skb_cb: off("sk_buff", "cb")?,
            skb_head: off("sk_buff", "head")?,
            skb_network_header: off("sk_buff", "network_header")?,
            skb_transport_header: off("sk_buff", "transport_header")?,
            skb_dev: off("sk_buff", "dev")?,
            dev_nd_net: off("net_device", "nd_net")?,
            tcb_gso_segs: off("tcp_skb_cb", "tcp_gso_segs")?,
            tcb_tcp_flags: off("tcp_skb_cb", "tcp_flags")?,
            timer_function: off("timer_list", "function")?,
            inet_sport: off("inet_sock", "inet_sport")?,
            // Only for counting keepalive probes exactly (see
            // `keepalive_probe_offsets`); filled in for the hooks alone.
            net_mib_stats: Offsets::MISSING,
            mib_tcp_keepalive: Offsets::MISSING,
            bpf_array_pptrs: Offsets::MISSING,
            sk_bpf_storage: off("sock", "sk_bpf_storage").unwrap_or(Offsets::MISSING),
        })
    }

    /// Where the hooks find this CPU's TcpExt.TCPKeepAlive counter of a
    /// namespace: `net.mib.net_statistics`, the counter's index
    /// (`LINUX_MIB_TCPKEEPALIVE`, in an anonymous enum) and `bpf_array.pptrs`.
    /// `None` when this kernel lacks one of them (the hooks then fall back
    /// to watching `icsk_probes_out`, which can miss a probe whose answer
    /// is processed on another CPU before the timer tracepoint returns).
    pub fn keepalive_probe_offsets(&self) -> Option<(u16, u16, u16)> {
        let off = |root: &str, path: &str| {
            let f = self.field(root, path).ok()?;
            u16::try_from(f.offset).ok()
        };
        let stats = off("net", "mib.net_statistics")?;
        let pptrs = off("bpf_array", "pptrs")?;
        let index = self.enumerator("LINUX_MIB_TCPKEEPALIVE")?;
        Some((stats, u16::try_from(index).ok()?, pptrs))
    }

    /// The value of enumerator `name` in any enum (named or not).
    pub fn enumerator(&self, name: &str) -> Option<u32> {
        // Type ids are dense from 1; the first that does not resolve ends them.
        let mut id = 1;
        while let Ok(t) = self.btf.resolve_type_by_id(id) {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    if self.btf.resolve_name(m).is_ok_and(|n| n == name) {
                        return Some(m.val());
                    }
                }
            }
            id += 1;
        }
        None
    }
}

impl KernelBtf {
    /// Offsets for the socket iterator. Optional fields become `u16::MAX`.
    pub fn snap_offsets(&self) -> Result<SnapOffsets> {
        let off = |root: &str, path: &str| -> Result<u16> {
            let f = self.field(root, path)?;
            u16::try_from(f.offset).with_context(|| format!("{root}.{path} offset too large"))
        };
        let opt = |root: &str, path: &str| off(root, path).unwrap_or(u16::MAX);
        let sk_ino = opt("sock", "sk_ino");
        let socket_to_ino = if sk_ino == u16::MAX {
            let socket = self.field("socket_alloc", "socket")?.offset;
            let inode = self.field("socket_alloc", "vfs_inode")?.offset;
            let i_ino = self.field("inode", "i_ino")?.offset;
            u16::try_from(inode + i_ino - socket)?
        } else {
            u16::MAX
        };
        let keepopen = self
            .enum_names("sock_flags", "")
            .iter()
            .position(|n| n.as_deref() == Some("SOCK_KEEPOPEN"))
            .ok_or_else(|| anyhow!("kernel BTF has no SOCK_KEEPOPEN in enum sock_flags"))?;
        Ok(SnapOffsets {
            // 6.18 moved sk_flags into sock_common (skc_flags).
            sk_flags: off("sock", "sk_flags").or_else(|_| off("sock_common", "skc_flags"))?,
            sk_socket: off("sock", "sk_socket")?,
            sk_ino,
            sk_ack_backlog: off("sock", "sk_ack_backlog")?,
            sk_max_ack_backlog: off("sock", "sk_max_ack_backlog")?,
            socket_to_ino,
            icsk_retransmits: off("inet_connection_sock", "icsk_retransmits")?,
            icsk_pending: off("inet_connection_sock", "icsk_pending")?,
            icsk_backoff: off("inet_connection_sock", "icsk_backoff")?,
            icsk_rto: off("inet_connection_sock", "icsk_rto")?,
            icsk_lrcvtime: off("inet_connection_sock", "icsk_ack.lrcvtime")?,
            timer_expires: off("timer_list", "expires")?,
            timer_pprev: off("timer_list", "entry.pprev")?,
            tp_keepalive_time: off("tcp_sock", "keepalive_time")?,
            tp_keepalive_intvl: off("tcp_sock", "keepalive_intvl")?,
            tp_keepalive_probes: off("tcp_sock", "keepalive_probes")?,
            tp_total_retrans: off("tcp_sock", "total_retrans")?,
            tp_lsndtime: off("tcp_sock", "lsndtime")?,
            tp_rcv_tstamp: off("tcp_sock", "rcv_tstamp")?,
            tp_copied_seq: off("tcp_sock", "copied_seq")?,
            tp_rcv_nxt: off("tcp_sock", "rcv_nxt")?,
            tp_write_seq: off("tcp_sock", "write_seq")?,
            tp_snd_una: off("tcp_sock", "snd_una")?,
            net_keepalive_time: off("net", "ipv4.sysctl_tcp_keepalive_time")?,
            net_keepalive_intvl: off("net", "ipv4.sysctl_tcp_keepalive_intvl")?,
            net_keepalive_probes: off("net", "ipv4.sysctl_tcp_keepalive_probes")?,
            net_retries2: off("net", "ipv4.sysctl_tcp_retries2")?,
            sock_keepopen_bit: keepopen as u16,
            tw_substate: off("inet_timewait_sock", "tw_substate")?,
            file_inode: opt("file", "f_inode"),
            inode_mode: opt("inode", "i_mode"),
            inode_ino: opt("inode", "i_ino"),
            task_tgid: opt("task_struct", "tgid"),
            _pad: [0; 3],
        })
    }

    /// Where a socket's cgroup and its ancestors are (for `cgroup =`
    /// policy rules); fields this kernel lacks are `u16::MAX`, and the
    /// tuning programs then never match a cgroup rule.
    pub fn tune_offsets(&self) -> TuneOffsets {
        let off = |root: &str, path: &str| {
            self.field(root, path)
                .ok()
                .and_then(|f| u16::try_from(f.offset).ok())
                .unwrap_or(u16::MAX)
        };
        TuneOffsets {
            sk_cgroup: off("sock", "sk_cgrp_data.cgroup"),
            cgroup_level: off("cgroup", "level"),
            cgroup_ancestors: off("cgroup", "ancestors"),
            cgroup_kn: off("cgroup", "kn"),
            kernfs_id: off("kernfs_node", "id"),
            _pad: [0; 3],
        }
    }

    /// Names of an enum's values indexed by value, with `prefix` removed
    /// (used for `enum sk_rst_reason`). Empty when the kernel lacks the enum.
    pub fn enum_names(&self, name: &str, prefix: &str) -> Vec<Option<String>> {
        let Ok(types) = self.btf.resolve_types_by_name(name) else {
            return Vec::new();
        };
        let mut out: Vec<Option<String>> = Vec::new();
        for t in types {
            if let Type::Enum(e) = t {
                for m in &e.members {
                    let v = m.val() as usize;
                    if v > 4096 {
                        continue;
                    }
                    let n = self.btf.resolve_name(m).unwrap_or_default();
                    if out.len() <= v {
                        out.resize(v + 1, None);
                    }
                    out[v] = Some(n.strip_prefix(prefix).unwrap_or(&n).to_string());
                }
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // These read the running kernel's BTF, which the monitor requires anyway.
    fn kernel() -> Option<KernelBtf> {
        Some(
            KernelBtf::load()
                .expect("these tests need the kernel's BTF at /sys/kernel/btf/vmlinux"),
        )
    }

    #[test]
    fn resolves_every_offset_on_this_kernel() {
        let Some(k) = kernel() else { return };
        let o = k.offsets().unwrap();
        // sock_common starts with the address pair on every kernel since 2.6.
        assert_eq!(o.skc_daddr, 0);
        assert_eq!(o.skc_rcv_saddr, 4);
        assert!(o.sk_protocol_size == 1 || o.sk_protocol_size == 2);
        assert_ne!(o.icsk_probes_out, o.icsk_user_timeout);
        assert_eq!(k.field("request_sock", "__req_common").unwrap().offset, 0);
        assert_eq!(k.tracepoint_args("tcp_retransmit_synack").unwrap(), 2);
        let t = k.tune_offsets();
        for (name, v) in [
            ("sk_cgroup", t.sk_cgroup),
            ("cgroup_level", t.cgroup_level),
            ("cgroup_ancestors", t.cgroup_ancestors),
            ("cgroup_kn", t.cgroup_kn),
            ("kernfs_id", t.kernfs_id),
        ] {
            assert_ne!(v, u16::MAX, "{name} missing from this kernel's BTF");
        }
    }

    #[test]
    fn anonymous_members_are_searched() {
        let Some(k) = kernel() else { return };
        // tcp_gso_segs lives in an anonymous struct inside an anonymous union.
        let f = k.field("tcp_skb_cb", "tcp_gso_segs").unwrap();
        assert_eq!(f.size, 2);
        assert!(k.field("sock_common", "no_such_field").is_err());
    }

    #[test]
    fn tracepoint_argument_counts() {
        let Some(k) = kernel() else { return };
        assert_eq!(k.tracepoint_args("inet_sock_set_state").unwrap(), 3);
        assert_eq!(k.tracepoint_args("tcp_receive_reset").unwrap(), 1);
        assert!(k.tracepoint_args("no_such_tracepoint").is_err());
    }

    #[test]
    fn reset_reason_names() {
        let Some(k) = kernel() else { return };
        let names = k.enum_names("sk_rst_reason", "SK_RST_REASON_");
        if !names.is_empty() {
            assert_eq!(names[0].as_deref(), Some("NOT_SPECIFIED"));
            assert_eq!(names[1].as_deref(), Some("NO_SOCKET"));
        }
    }

    #[test]
    fn keepalive_counter_offsets() {
        let Some(k) = kernel() else { return };
        let (stats, index, pptrs) = k.keepalive_probe_offsets().unwrap();
        // LINUX_MIB_NUM is 0; the counter array has __LINUX_MIB_MAX entries.
        assert_eq!(k.enumerator("LINUX_MIB_NUM"), Some(0));
        let max = k.enumerator("__LINUX_MIB_MAX").unwrap();
        assert!(index > 0 && (index as u32) < max, "{index} of {max}");
        assert!(stats > 0 && pptrs > 0);
        assert_eq!(k.enumerator("NO_SUCH_ENUMERATOR_ANYWHERE"), None);
    }
}
