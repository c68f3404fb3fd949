package testenv

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// portRange is the n ports from first.
type portRange struct{ first, n int }

func (r portRange) overlaps(o portRange) bool {
	return r.first < o.first+o.n && o.first < r.first+r.n
}

func portLockDir() string { return filepath.Join(os.TempDir(), "redis-agent-testenv-ports") }

func blockLock(first int) string {
	return filepath.Join(portLockDir(), "block-"+strconv.Itoa(first/portBlock*portBlock)+".lock")
}

// lockHolders returns the pids /proc/locks names as holding a flock on
// path; the test is skipped without /proc/locks.
func lockHolders(t *testing.T, path string) []int {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		t.Skipf("no /proc/locks: %v", err)
	}
	// "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF": the device's
	// major and minor in hex, the inode in decimal.
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	var pids []int
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 6 && f[1] == "FLOCK" && f[5] == want {
			pid, _ := strconv.Atoi(f[4])
			pids = append(pids, pid)
		}
	}
	return pids
}

func holds(pids []int, pid int) bool {
	for _, p := range pids {
		if p == pid {
			return true
		}
	}
	return false
}

// checkRange fails unless every port of r can be bound on 127.0.0.1 and r
// lies inside the region, outside the ephemeral ports.
func checkRange(t *testing.T, r portRange) {
	t.Helper()
	lo, hi := portRegion()
	if r.first < lo || r.first+r.n > hi {
		t.Fatalf("range %d-%d outside the region %d-%d", r.first, r.first+r.n-1, lo, hi-1)
	}
	for p := r.first; p < r.first+r.n; p++ {
		l, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			t.Fatalf("port %d of range %d-%d: %v", p, r.first, r.first+r.n-1, err)
		}
		l.Close()
	}
}

func TestPortRegionAvoidsEphemeralPorts(t *testing.T) {
	lo, hi := portRegion()
	if lo%portBlock != 0 || hi%portBlock != 0 || hi-lo < 1024 || lo < portFloor || hi > 65536 {
		t.Fatalf("region %d-%d: want block-aligned, at least 1024 ports, from %d", lo, hi, portFloor)
	}
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		t.Skip(err)
	}
	var elo, ehi int
	fmt.Sscan(string(b), &elo, &ehi)
	if lo <= ehi && elo < hi {
		t.Fatalf("region %d-%d overlaps the ephemeral ports %d-%d", lo, hi-1, elo, ehi)
	}
}

// Ranges of one process are free to bind, disjoint, held by this process
// while the test runs and released at its end.
func TestPortsDisjointAndReleased(t *testing.T) {
	var got []portRange
	t.Run("take", func(t *testing.T) {
		for _, n := range []int{1, 20, 20, portBlock, portBlock + 1, 100} {
			r := portRange{Ports(t, n), n}
			checkRange(t, r)
			for _, o := range got {
				if r.overlaps(o) {
					t.Fatalf("range %+v overlaps %+v", r, o)
				}
			}
			got = append(got, r)
			for p := r.first; p < r.first+n; p += portBlock {
				if !holds(lockHolders(t, blockLock(p)), os.Getpid()) {
					t.Fatalf("block of port %d of %+v is not locked by this process", p, r)
				}
			}
		}
	})
	for _, r := range got {
		for p := r.first; p < r.first+r.n; p += portBlock {
			if holds(lockHolders(t, blockLock(p)), os.Getpid()) {
				t.Fatalf("block of port %d still locked after the test that took it ended", p)
			}
		}
	}
}

func TestPortsSkipsBusyAndHeld(t *testing.T) {
	first := Ports(t, portBlock)
	l, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(first+3))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if portsFree(first, portBlock) {
		t.Fatalf("portsFree(%d, %d) with port %d listening", first, portBlock, first+3)
	}
	if !portsFree(first, 3) {
		t.Fatalf("portsFree(%d, 3): the listener is on %d", first, first+3)
	}
	// Held by this test: a second open of the lock file in this same
	// process does not get it.
	if locks, ok := lockPortBlocks(portLockDir(), first, 1); ok {
		closeAll(locks)
		t.Fatal("locked a block this process holds through another open")
	}
}

const portsHelperEnv = "TESTENV_PORTS_HELPER" // ranges the helper takes

// TestPortsHelperProcess is the other test process of
// TestPortsAcrossProcesses: it takes ranges, prints them and holds them
// until its standard input closes.
func TestPortsHelperProcess(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv(portsHelperEnv))
	if n == 0 {
		return // not the helper
	}
	var out []string
	for range n {
		out = append(out, strconv.Itoa(Ports(t, 20)))
	}
	fmt.Println("ranges", strings.Join(out, " "))
	bufio.NewReader(os.Stdin).ReadString('\n')
}

// Two test processes never hold the same range: what one holds the other
// cannot lock, Ports in the other skips it, and the locks go with the
// process.
func TestPortsAcrossProcesses(t *testing.T) {
	const n = 8
	cmd := exec.Command(os.Args[0], "-test.run=^TestPortsHelperProcess$", "-test.count=1")
	cmd.Env = append(os.Environ(), portsHelperEnv+"="+strconv.Itoa(n))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(stdout).ReadString('\n')
	f := strings.Fields(line)
	if err != nil || len(f) != n+1 || f[0] != "ranges" {
		t.Fatalf("helper said %q, %v", line, err)
	}
	var theirs []portRange
	for _, s := range f[1:] {
		p, _ := strconv.Atoi(s)
		theirs = append(theirs, portRange{p, 20})
		if !holds(lockHolders(t, blockLock(p)), cmd.Process.Pid) {
			t.Fatalf("the helper's range from %d is not locked by it", p)
		}
		if locks, ok := lockPortBlocks(portLockDir(), p, 1); ok {
			closeAll(locks)
			t.Fatalf("this process locked the block of port %d, which the helper holds", p)
		}
	}
	for range n {
		mine := portRange{Ports(t, 20), 20}
		for _, o := range theirs {
			if mine.overlaps(o) {
				t.Fatalf("this process got %+v, which overlaps the helper's %+v", mine, o)
			}
		}
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	for _, r := range theirs {
		if holds(lockHolders(t, blockLock(r.first)), cmd.Process.Pid) {
			t.Fatalf("the block of port %d is still locked by the ended helper", r.first)
		}
	}
}
