package testenv

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// portBlock is the grain of Ports: a range is made of whole blocks of
// portBlock ports, each aligned to a multiple of portBlock (so processes
// that see different bounds still agree on the blocks) and guarded by one
// lock file.
const portBlock = 32

// portFloor is the lowest port Ports hands out.
const portFloor = 22000

// Ports gives the test n consecutive loopback ports that no other test
// holds, in this process or in any other (go test runs the test binaries
// of packages in parallel), and returns the first. Each of the n ports was
// free to bind on 127.0.0.1 when Ports returned, and the range stays the
// test's until it ends (t.Cleanup). A test that restarts an agent on the
// same range calls Ports once and keeps the number.
//
// Ranges lie outside the kernel's ephemeral ports
// (net.ipv4.ip_local_port_range), so FreePort, a listener on port 0 and
// outgoing connections never take one meanwhile. Holding a range is a
// flock on a file per block under os.TempDir(); the kernel drops the locks
// of a test process that dies, and the bind check skips the ports of
// anything it left listening.
func Ports(t testing.TB, n int) (first int) {
	t.Helper()
	if n < 1 {
		t.Fatalf("testenv.Ports(%d): want at least one port", n)
	}
	lo, hi := portRegion()
	blocks := (n + portBlock - 1) / portBlock
	starts := (hi-lo)/portBlock - blocks + 1 // first blocks a range can start at
	if starts < 1 {
		t.Fatalf("testenv.Ports(%d): only ports %d-%d lie outside the ephemeral range", n, lo, hi-1)
	}
	dir := filepath.Join(os.TempDir(), "redis-agent-testenv-ports")
	if err := os.MkdirAll(dir, 0o777); err != nil {
		t.Fatalf("testenv.Ports: %v", err)
	}
	os.Chmod(dir, 0o777) // every user's tests share it; not fatal when another user made it
	// A random start spreads parallel test processes over the region, so
	// they seldom try the same blocks.
	from := rand.IntN(starts)
	for i := range starts {
		p := lo + (from+i)%starts*portBlock
		locks, ok := lockPortBlocks(dir, p, blocks)
		if !ok {
			continue
		}
		if portsFree(p, n) {
			t.Cleanup(func() { closeAll(locks) })
			return p
		}
		closeAll(locks)
	}
	t.Fatalf("testenv.Ports(%d): every range of %d-%d is held by another test or in use", n, lo, hi-1)
	return 0
}

// portRegion returns the ports [lo, hi) Ports takes ranges from, both
// multiples of portBlock: from portFloor up to the ephemeral range, or
// above it when there is more room there.
func portRegion() (lo, hi int) {
	ephLo, ephHi := 32768, 60999 // Linux's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			l, err1 := strconv.Atoi(f[0])
			h, err2 := strconv.Atoi(f[1])
			if err1 == nil && err2 == nil && l <= h {
				ephLo, ephHi = l, h
			}
		}
	}
	roundUp := func(p int) int { return (p + portBlock - 1) / portBlock * portBlock }
	roundDown := func(p int) int { return p / portBlock * portBlock }
	belowLo, belowHi := roundUp(portFloor), roundDown(ephLo)
	aboveLo, aboveHi := roundUp(max(ephHi+1, portFloor)), roundDown(65536)
	if aboveHi-aboveLo > belowHi-belowLo {
		return aboveLo, aboveHi
	}
	return belowLo, max(belowHi, belowLo)
}

// lockPortBlocks takes the lock files of the blocks of count blocks from
// port first, without waiting: ok is false, and nothing held, when
// another holder has one of them.
func lockPortBlocks(dir string, first, count int) (locks []*os.File, ok bool) {
	for b := range count {
		name := filepath.Join(dir, fmt.Sprintf("block-%d.lock", first+b*portBlock))
		// Read-only is enough for flock, and opens a file another user
		// made.
		f, err := os.OpenFile(name, os.O_RDONLY|os.O_CREATE, 0o644)
		if err != nil {
			closeAll(locks)
			return nil, false
		}
		// flock belongs to the open file, not the process: a second open in
		// this process conflicts like one in another process does.
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			closeAll(locks)
			return nil, false
		}
		locks = append(locks, f)
	}
	return locks, true
}

// portsFree reports whether each of the n ports from first can be bound
// on 127.0.0.1.
func portsFree(first, n int) bool {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for p := first; p < first+n; p++ {
		l, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			return false
		}
		ls = append(ls, l)
	}
	return true
}

// closeAll closes files, releasing their locks.
func closeAll(files []*os.File) {
	for _, f := range files {
		f.Close()
	}
}
