// Package confine is the step between the agent and every redis-server it
// starts: the launcher (cmd/redis-agent-launch) parses a Policy from its
// arguments, applies it to itself and execs redis-server, which inherits
// all of it.
//
// What a Policy applies, in this order, each kept across execve:
//
//   - no_new_privs: no setuid binary or file capability grants anything;
//   - Landlock (best effort up to the kernel's ABI): read and execute of
//     the binary, the shared libraries and the few system files Redis
//     reads; read and write of the instance's own data directory and log;
//     nothing else of the filesystem. And (ABI 6) no signal to a process
//     outside the domain, and no abstract unix socket outside it;
//   - a seccomp filter refusing what a Redis never needs and an attacker
//     in one would (ptrace, process_vm_*, mount, bpf, perf_event_open,
//     kexec, keyring, modules, namespaces, io_uring, ...): see Seccomp.
//
// The uid and gid the process runs as are the caller's (exec.Cmd's
// Credential): the launcher runs unprivileged already.
package confine

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	ll "github.com/landlock-lsm/go-landlock/landlock/syscall"
	"golang.org/x/sys/unix"
)

// Policy is what a confined process may reach.
type Policy struct {
	// Exec are files it may execute and read (the redis-server binary).
	Exec []string
	// ReadOnly are files or directories it may read (config, ACL file).
	ReadOnly []string
	// ReadWrite are directories or files it may read, write, create in
	// and remove from (its data directory, its log).
	ReadWrite []string
	// NoLandlock and NoSeccomp leave a layer out: the kernel lacks it
	// (Support says so), or an operator turned it off.
	NoLandlock, NoSeccomp bool
}

// systemRead are what redis-server and redis-check-rdb read besides their
// own files, found with strace: the dynamic loader's cache and libraries,
// time zone, locale, OpenSSL's config, and the /proc and /sys files Redis
// reads for its warnings and INFO. Missing ones are skipped.
var systemRead = []string{
	"/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib",
	"/etc/ld.so.cache", "/etc/ld.so.preload", "/etc/localtime", "/etc/malloc.conf",
	"/usr/share/zoneinfo", "/usr/share/locale", "/etc/locale.alias", "/etc/ssl/openssl.cnf",
	"/proc/sys/vm/overcommit_memory", "/proc/sys/net/core/somaxconn",
	"/sys/kernel/mm/transparent_hugepage", "/sys/devices/system/cpu",
	"/sys/devices/system/clocksource/clocksource0/current_clocksource",
	"/dev/urandom", "/dev/random",
}

// systemBin are what a script in Exec may run: its interpreter and what it
// execs (a wrapper that execs redis-server, as tests and some operators
// use). Only granted when an Exec file is a script.
var systemBin = []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"}

// systemReadWrite are the device files everyone may write.
var systemReadWrite = []string{"/dev/null"}

// Args encodes p as the launcher's arguments before "--".
func (p Policy) Args() []string {
	args := make([]string, 0, 2*(len(p.Exec)+len(p.ReadOnly)+len(p.ReadWrite))+2)
	for _, f := range p.Exec {
		args = append(args, "--exec", f)
	}
	for _, f := range p.ReadOnly {
		args = append(args, "--ro", f)
	}
	for _, f := range p.ReadWrite {
		args = append(args, "--rw", f)
	}
	if p.NoLandlock {
		args = append(args, "--no-landlock")
	}
	if p.NoSeccomp {
		args = append(args, "--no-seccomp")
	}
	return args
}

// Parse reads what Args wrote, up to "--", and returns the command after
// it.
func Parse(args []string) (Policy, []string, error) {
	var p Policy
	for len(args) > 0 {
		a := args[0]
		args = args[1:]
		switch a {
		case "--":
			if len(args) == 0 {
				return p, nil, errors.New("no command after --")
			}
			return p, args, nil
		case "--no-landlock":
			p.NoLandlock = true
		case "--no-seccomp":
			p.NoSeccomp = true
		case "--exec", "--ro", "--rw":
			if len(args) == 0 || !filepath.IsAbs(args[0]) {
				return p, nil, fmt.Errorf("%s wants an absolute path", a)
			}
			switch a {
			case "--exec":
				p.Exec = append(p.Exec, args[0])
			case "--ro":
				p.ReadOnly = append(p.ReadOnly, args[0])
			default:
				p.ReadWrite = append(p.ReadWrite, args[0])
			}
			args = args[1:]
		default:
			return p, nil, fmt.Errorf("unknown argument %q", a)
		}
	}
	return p, nil, errors.New("no -- and command")
}

// launcherEnv is what the launcher's environment has besides the
// command's, for the launcher's own Go runtime: one P, which saves a
// fifth of its start on two cores and more on more (a P each costs its
// allocation at start). Exec takes it out again.
var launcherEnv = []string{"GOMAXPROCS=1"}

// Command is the exec.Cmd that runs name with args under p through the
// launcher; with no launcher it runs name unconfined. Its Env holds what
// only the launcher needs: a caller adds the command's environment to it
// rather than replacing it.
func Command(ctx context.Context, launcher string, p Policy, name string, args ...string) *exec.Cmd {
	if launcher == "" {
		return exec.CommandContext(ctx, name, args...)
	}
	largs := append(p.Args(), "--", name)
	cmd := exec.CommandContext(ctx, launcher, append(largs, args...)...)
	cmd.Env = slices.Clone(launcherEnv)
	return cmd
}

// Apply confines the calling thread (and, for Landlock, every thread of
// the process) by p: what the launcher does just before it execs. It locks
// the goroutine to its thread, which the exec must then run on.
func Apply(p Policy) error {
	runtime.LockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	if !p.NoLandlock {
		if err := landlockRestrict(p); err != nil {
			return fmt.Errorf("landlock: %w", err)
		}
	}
	if !p.NoSeccomp {
		if err := LoadSeccomp(); err != nil {
			return fmt.Errorf("seccomp: %w", err)
		}
	}
	return nil
}

// Landlock access rights, as the kernel names them.
const (
	fileRead  = ll.AccessFSExecute | ll.AccessFSReadFile
	dirRead   = fileRead | ll.AccessFSReadDir
	fileWrite = ll.AccessFSReadFile | ll.AccessFSWriteFile | ll.AccessFSTruncate
	// dirWrite is every right of its ABI (the mask takes the ones it has).
	dirWrite = 1<<17 - 1
)

// handledFS is what Landlock ABI abi can restrict of the filesystem.
func handledFS(abi int) uint64 {
	switch {
	case abi >= 5:
		return 1<<16 - 1 // up to ioctl on devices
	case abi >= 3:
		return 1<<15 - 1 // up to truncate
	case abi == 2:
		return 1<<14 - 1 // up to refer
	default:
		return 1<<13 - 1
	}
}

// landlockRestrict applies p's filesystem rules and, from ABI 6, the
// signal and abstract-socket scopes, to the calling thread only: the exec
// that follows on it is all that has to carry them, and go-landlock's
// all-threads enforcement (psx) costs more than the rest of the launcher.
// The raw calls are go-landlock's.
func landlockRestrict(p Policy) error {
	abi, err := ll.LandlockGetABIVersion()
	if err != nil || abi < 1 {
		return fmt.Errorf("not supported by the kernel: %v", err)
	}
	handled := handledFS(abi)
	attr := ll.RulesetAttr{HandledAccessFS: handled}
	if abi >= 6 {
		attr.Scoped = ll.ScopeAbstractUnixSocket | ll.ScopeSignal
	}
	fd, err := ll.LandlockCreateRuleset(&attr, 0)
	if err != nil {
		return fmt.Errorf("create ruleset: %w", err)
	}
	defer unix.Close(fd)
	add := func(paths []string, write, optional bool) error {
		for _, f := range paths {
			if err := addPath(fd, f, handled, write); err != nil && !(optional && errors.Is(err, fs.ErrNotExist)) {
				return err
			}
		}
		return nil
	}
	self := "/proc/" + strconv.Itoa(os.Getpid()) // the pid redis-server will have
	for _, r := range []struct {
		paths           []string
		write, optional bool
	}{
		{[]string{self}, false, false},
		{systemRead, false, true},
		{systemReadWrite, true, true},
		{p.Exec, false, false},
		{scriptBins(p.Exec), false, true},
		{p.ReadOnly, false, false},
		{p.ReadWrite, true, false},
	} {
		if err := add(r.paths, r.write, r.optional); err != nil {
			return err
		}
	}
	if err := ll.LandlockRestrictSelf(fd, 0); err != nil {
		return fmt.Errorf("restrict: %w", err)
	}
	return nil
}

// scriptBins is systemBin when one of exec is a script ("#!"), else nil.
func scriptBins(exec []string) []string {
	for _, f := range exec {
		fd, err := os.Open(f)
		if err != nil {
			continue
		}
		head := make([]byte, 2)
		n, _ := fd.Read(head)
		fd.Close()
		if n == 2 && string(head) == "#!" {
			return systemBin
		}
	}
	return nil
}

// addPath grants read (and write) beneath path: a directory and what is in
// it, or one file, as far as handled goes.
func addPath(fd int, path string, handled uint64, write bool) error {
	pfd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	var access uint64
	switch dir := st.Mode&unix.S_IFMT == unix.S_IFDIR; {
	case dir && write:
		access = dirWrite
	case dir:
		access = dirRead
	case write:
		access = fileWrite
	default:
		access = fileRead
	}
	rule := ll.PathBeneathAttr{AllowedAccess: access & handled, ParentFd: pfd}
	if err := ll.LandlockAddPathBeneathRule(fd, &rule, 0); err != nil {
		return fmt.Errorf("landlock rule for %s: %w", path, err)
	}
	return nil
}

// Exec replaces the process with argv[0], found on PATH if it has no
// slash, with the environment it has but the launcher's own (Command).
func Exec(argv []string) error {
	bin := argv[0]
	if !strings.Contains(bin, "/") {
		p, err := exec.LookPath(bin)
		if err != nil {
			return err
		}
		bin = p
	}
	return syscall.Exec(bin, argv, commandEnv(os.Environ()))
}

// commandEnv is env without the launcher's own entries.
func commandEnv(env []string) []string {
	return slices.DeleteFunc(env, func(e string) bool { return slices.Contains(launcherEnv, e) })
}

// Support is what the kernel offers of the layers.
type Support struct {
	// Landlock is the kernel's Landlock ABI version, 0 for none.
	Landlock int
	// Seccomp says whether seccomp filters can be loaded.
	Seccomp bool
}

// Probe asks the kernel what it supports.
func Probe() Support {
	var s Support
	v, _, errno := unix.Syscall(unix.SYS_LANDLOCK_CREATE_RULESET, 0, 0, 1 /* LANDLOCK_CREATE_RULESET_VERSION */)
	if errno == 0 {
		s.Landlock = int(v)
	}
	// Strict mode with a flag set is EINVAL wherever seccomp exists.
	_, _, errno = unix.Syscall(unix.SYS_SECCOMP, 0 /* SECCOMP_SET_MODE_STRICT */, 1, 0)
	s.Seccomp = errno == unix.EINVAL
	return s
}

// Missing says what of the layers the kernel lacks, "" for nothing.
func (s Support) Missing() string {
	var miss []string
	if s.Landlock == 0 {
		miss = append(miss, "Landlock (no filesystem confinement)")
	} else if s.Landlock < 6 {
		miss = append(miss, fmt.Sprintf("Landlock ABI 6 (the kernel has %d: no signal scoping)", s.Landlock))
	}
	if !s.Seccomp {
		miss = append(miss, "seccomp (no system call filter)")
	}
	return strings.Join(miss, ", ")
}
