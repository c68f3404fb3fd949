package filter

import (
	"encoding/binary"
	"testing"

	seccomp "github.com/elastic/go-seccomp-bpf"
	"github.com/elastic/go-seccomp-bpf/arch"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// run evaluates the filter on one system call, as the kernel would: the
// program reads struct seccomp_data (nr, arch, ip, args) in the host's
// byte order, which x/net/bpf's VM reads as big-endian words, so each
// 32-bit word is laid out big-endian where the kernel has it.
func run(t *testing.T, vm *bpf.VM, auditArch uint32, nr int, args ...uint64) uint32 {
	t.Helper()
	data := make([]byte, 64)
	binary.BigEndian.PutUint32(data[0:], uint32(nr))
	binary.BigEndian.PutUint32(data[4:], auditArch)
	for i, a := range args {
		off := 16 + 8*i
		binary.BigEndian.PutUint32(data[off:], uint32(a))       // low word first, as on little-endian
		binary.BigEndian.PutUint32(data[off+4:], uint32(a>>32)) // then the high word
	}
	v, err := vm.Run(data)
	if err != nil {
		t.Fatal(err)
	}
	return uint32(v)
}

func program(t *testing.T) (*bpf.VM, *arch.Info) {
	t.Helper()
	raw, err := Program()
	if err != nil {
		t.Fatal(err)
	}
	insts := make([]bpf.Instruction, len(raw))
	for i, r := range raw {
		insts[i] = r.Disassemble()
	}
	vm, err := bpf.NewVM(insts)
	if err != nil {
		t.Fatal(err)
	}
	native, err := arch.GetInfo("")
	if err != nil {
		t.Fatal(err)
	}
	return vm, native
}

var (
	eperm  = uint32(seccomp.ActionErrno) | uint32(unix.EPERM)
	enosys = uint32(seccomp.ActionErrno) | uint32(unix.ENOSYS)
	allow  = uint32(seccomp.ActionAllow)
	kill   = uint32(seccomp.ActionKillProcess)
)

// Every refused system call is EPERM, whatever its arguments.
func TestRefusedCalls(t *testing.T) {
	vm, native := program(t)
	for _, name := range Refused {
		nr, ok := native.SyscallNames[name]
		if !ok {
			t.Fatalf("%s has no number on %s", name, native.Name)
		}
		for _, args := range [][]uint64{nil, {0, 0, 0}, {^uint64(0), 1, 2, 3, 4, 5}} {
			if got := run(t, vm, uint32(native.ID), nr, args...); got != eperm {
				t.Errorf("%s%v -> %#x, want EPERM (%#x)", name, args, got, eperm)
			}
		}
	}
}

// What a redis-server does is let through: the filter is a deny list,
// and a call it refuses by mistake would break Redis.
func TestRedisCallsAllowed(t *testing.T) {
	vm, native := program(t)
	for _, name := range []string{"read", "write", "openat", "close", "epoll_wait", "accept4", "fork", "execve", "mmap", "futex", "fsync", "rename", "kill", "wait4", "prctl", "getpid"} {
		if got := run(t, vm, uint32(native.ID), native.SyscallNames[name], 3, 0, 0); got != allow {
			t.Errorf("%s -> %#x, want allow", name, got)
		}
	}
}

// clone making any namespace is refused; a thread's or a fork's clone
// is not; clone3 (flags out of the filter's sight) is ENOSYS, so the C
// library falls back to clone.
func TestClone(t *testing.T) {
	vm, native := program(t)
	clone := native.SyscallNames["clone"]
	thread := uint64(unix.CLONE_VM | unix.CLONE_FS | unix.CLONE_FILES | unix.CLONE_SIGHAND | unix.CLONE_THREAD | unix.CLONE_SYSVSEM | unix.CLONE_SETTLS | unix.CLONE_PARENT_SETTID | unix.CLONE_CHILD_CLEARTID)
	fork := uint64(unix.CLONE_CHILD_SETTID | unix.CLONE_CHILD_CLEARTID | uint64(unix.SIGCHLD))
	for _, flags := range []uint64{thread, fork, uint64(unix.SIGCHLD)} {
		if got := run(t, vm, uint32(native.ID), clone, flags); got != allow {
			t.Errorf("clone(%#x) -> %#x, want allow", flags, got)
		}
	}
	for _, ns := range []uint64{unix.CLONE_NEWNS, unix.CLONE_NEWUTS, unix.CLONE_NEWIPC, unix.CLONE_NEWUSER, unix.CLONE_NEWPID, unix.CLONE_NEWNET, unix.CLONE_NEWCGROUP, unix.CLONE_NEWTIME} {
		for _, flags := range []uint64{ns, ns | fork, ns | thread} {
			if got := run(t, vm, uint32(native.ID), clone, flags); got != eperm {
				t.Errorf("clone(%#x) -> %#x, want EPERM", flags, got)
			}
		}
	}
	if got := run(t, vm, uint32(native.ID), native.SyscallNames["clone3"], 0, 88); got != enosys {
		t.Errorf("clone3 -> %#x, want ENOSYS", got)
	}
}

// A system call of another architecture (i386's int 0x80 on x86-64,
// where ptrace is 26) kills the process: go-seccomp-bpf alone would let
// it through to the default action, allow.
func TestForeignArchitectureKills(t *testing.T) {
	vm, _ := program(t)
	const auditArchI386 = 0x40000003
	for _, nr := range []int{26 /* ptrace */, 20 /* getpid */} {
		if got := run(t, vm, auditArchI386, nr); got != kill {
			t.Errorf("i386 call %d -> %#x, want kill (%#x)", nr, got, kill)
		}
	}
	// And the guard is what does it: the policy's own program, without
	// it, lets the i386 ptrace through.
	pol := Seccomp()
	body, err := pol.Assemble()
	if err != nil {
		t.Fatal(err)
	}
	bare, err := bpf.NewVM(body)
	if err != nil {
		t.Fatal(err)
	}
	if got := run(t, bare, auditArchI386, 26); got != allow {
		t.Fatalf("without the guard an i386 ptrace -> %#x; the guard test proves nothing", got)
	}
}
