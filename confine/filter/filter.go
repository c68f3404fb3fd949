// Package filter is the seccomp policy of every process the agent
// confines, as go-seccomp-bpf assembles it. The launcher does not
// assemble it at each start: package confine holds the program generated
// from it (go generate ./confine), and a test keeps the two equal.
package filter

import (
	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Refused are the system calls the filter answers with EPERM: none of
// them is anything redis-server or redis-check-rdb makes, each is a step
// an attacker inside one would take (read or change another process,
// reach the kernel's less-trodden interfaces, or make a namespace in which
// it holds capabilities).
var Refused = []string{
	// Another process's memory and execution.
	"ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
	// Filesystems and the root.
	"mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick",
	"move_mount", "open_tree", "mount_setattr", "open_by_handle_at", "name_to_handle_at",
	"swapon", "swapoff", "quotactl",
	// The kernel's programmable and privileged interfaces.
	"bpf", "perf_event_open", "userfaultfd", "kexec_load", "kexec_file_load", "reboot",
	"init_module", "finit_module", "delete_module", "acct", "iopl", "ioperm",
	"add_key", "request_key", "keyctl",
	"io_uring_setup", "io_uring_enter", "io_uring_register",
	// Namespaces, made or joined.
	"unshare", "setns",
}

// namespaceFlags are clone's flags that make a namespace; a clone with any
// of them is refused. clone3 passes its flags in memory a filter cannot
// read, so it answers ENOSYS and the C library falls back to clone.
var namespaceFlags = []uint64{
	unix.CLONE_NEWNS, unix.CLONE_NEWUTS, unix.CLONE_NEWIPC, unix.CLONE_NEWUSER,
	unix.CLONE_NEWPID, unix.CLONE_NEWNET, unix.CLONE_NEWCGROUP, unix.CLONE_NEWTIME,
}

// Seccomp is the filter's policy: allow by default, refuse Refused and
// namespace-making clones with EPERM, and clone3 with ENOSYS.
func Seccomp() seccomp.Policy {
	clones := make([]seccomp.NameWithConditions, 0, len(namespaceFlags))
	for _, f := range namespaceFlags {
		clones = append(clones, seccomp.NameWithConditions{Name: "clone",
			Conditions: seccomp.ArgumentConditions{{Argument: 0, Operation: seccomp.BitsSet, Value: f}}})
	}
	return seccomp.Policy{
		DefaultAction: seccomp.ActionAllow,
		Syscalls: []seccomp.SyscallGroup{
			{Names: Refused, Action: seccomp.ActionErrno},
			{NamesWithCondtions: clones, Action: seccomp.ActionErrno},
			{Names: []string{"clone3"}, Action: seccomp.ActionErrno | seccomp.Action(unix.ENOSYS)},
		},
	}
}

// Program is the filter as BPF, with a guard in front of the policy's own
// program: go-seccomp-bpf lets a system call of another architecture
// through to its default action (allow), and on x86-64 a process may make
// i386 system calls (int 0x80), where ptrace has another number. The
// guard kills the process on any architecture but the native one.
func Program() ([]bpf.RawInstruction, error) {
	pol := Seccomp()
	body, err := pol.Assemble()
	if err != nil {
		return nil, err
	}
	native, err := arch.GetInfo("")
	if err != nil {
		return nil, err
	}
	guard := []bpf.Instruction{
		bpf.LoadAbsolute{Off: 4, Size: 4}, // seccomp_data.arch
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: uint32(native.ID), SkipTrue: 1},
		bpf.RetConstant{Val: uint32(seccomp.ActionKillProcess)},
	}
	return bpf.Assemble(append(guard, body...))
}
