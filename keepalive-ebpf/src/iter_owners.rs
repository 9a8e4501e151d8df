//! The `iter/task_file` program: one [`OwnerRow`] per socket descriptor
//! of every process, the kernel half of `snapshot`'s owners (what
//! `ss -p` learns by reading every `/proc/PID/fd` link, one system call
//! per descriptor).

use aya_ebpf::helpers::generated::bpf_seq_write;
use keepalive_common::{Offsets, OwnerRow};

use crate::maps::config;
use crate::mem::load;

/// Context of an `iter/task_file` program:
/// `struct bpf_iter__task_file { struct bpf_iter_meta *meta;
/// struct task_struct *task; u32 fd; struct file *file; }` (pointers
/// 8-byte aligned, `__bpf_md_ptr`).
#[repr(C)]
pub struct IterTaskFileCtx {
    pub meta: *const u8,
    pub task: *const u8,
    pub fd: u32,
    pub file: *const u8,
}

/// `S_IFMT` and `S_IFSOCK` of `inode.i_mode`.
const S_IFMT: u16 = 0o170000;
const S_IFSOCK: u16 = 0o140000;

/// Visits every open file of every process (threads sharing their
/// leader's table are skipped by the kernel) and writes the socket
/// inodes with their process.
// int prog(struct bpf_iter__task_file *ctx)
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/task_file")]
extern "C" fn ka_iter_owners(ctx: *mut IterTaskFileCtx) -> i32 {
    // SAFETY: the kernel passes a valid context.
    let (meta, task, file) = unsafe { ((*ctx).meta, (*ctx).task, (*ctx).file) };
    if meta.is_null() || task.is_null() || file.is_null() {
        return 0;
    }
    let o = &config().snap;
    if o.file_inode == Offsets::MISSING
        || o.inode_mode == Offsets::MISSING
        || o.inode_ino == Offsets::MISSING
        || o.task_tgid == Offsets::MISSING
    {
        return 0;
    }
    // Plain loads: `file` and `task` are trusted pointers from the
    // iterator and the offsets read-only constants, so the verifier checks
    // each against the kernel's BTF (no probe-read helper call per field).
    let inode: *const u8 = load(file, o.file_inode);
    if inode.is_null() {
        return 0;
    }
    let mode: u16 = load(inode, o.inode_mode);
    if mode & S_IFMT != S_IFSOCK {
        return 0;
    }
    let row = OwnerRow {
        ino: load(inode, o.inode_ino),
        pid: load(task, o.task_tgid),
        _pad: 0,
    };
    // SAFETY: meta is the trusted iterator metadata; seq is its first field.
    let seq = unsafe { *(meta as *const *mut core::ffi::c_void) };
    // SAFETY: row lives on the stack for the call.
    unsafe {
        bpf_seq_write(
            seq as *mut _,
            (&raw const row).cast(),
            core::mem::size_of::<OwnerRow>() as u32,
        )
    };
    0
}
