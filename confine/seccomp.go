package confine

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

//go:generate go run ./internal/genfilter -o seccomp_bpf.go

// LoadSeccomp installs the filter of package filter (seccompProgram) on the calling thread, which must have
// no_new_privs set (Apply does both).
func LoadSeccomp() error {
	filter := append([]unix.SockFilter(nil), seccompProgram...)
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}
	_, _, errno := unix.Syscall(unix.SYS_SECCOMP, 1 /* SECCOMP_SET_MODE_FILTER */, 0, uintptr(unsafe.Pointer(&prog)))
	if errno != 0 {
		return fmt.Errorf("load the filter: %w", errno)
	}
	return nil
}
