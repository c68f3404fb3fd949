package testenv

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Host is one test host made by Hosts: a network namespace whose eth0
// (Addr/24, default route via the bridge's .1) is one end of a veth pair;
// the other end, Link, sits in the root namespace on the test's bridge.
// The root namespace, where the test binary runs, reaches every Addr, and
// the hosts reach each other and the bridge's address.
type Host struct {
	Name string // "h0", "h1", ...: for messages
	NS   string // network namespace, as `ip netns` names it
	Addr string // eth0's IPv4 address inside NS, without prefix length
	Link string // root-side veth name; Cut and Restore take it down and up
}

// hostsCalls numbers the calls of Hosts in this process: with the pid it
// makes names and subnets unique.
var hostsCalls atomic.Int64

// netnsLock serialises, within this process, what the lock file does
// between processes (flock is per open file, not per process).
var netnsLock sync.Mutex

// Hosts makes n test hosts on one fresh Linux bridge in the root network
// namespace, in a 10.x.y.0/24 that no address or route of the machine
// uses: the bridge has 10.x.y.1 and host i has 10.x.y.(10+i). It needs
// root and iproute2's ip: without them the test is skipped, or fails under
// CI (CI=true). Everything it makes (namespaces, veths, bridge) is removed
// in t.Cleanup, also when the test fails half way through Hosts itself;
// processes a test started in a host should be ended by the test's own
// cleanups, which run before this one as they are registered after it.
//
// Names are "rab" + pid + "-" + call number (base 36): the bridge is that,
// host i's veth that + "-v<i>" and its namespace that + "-h<i>". What a
// crashed run left under the same names, or under the names of a process
// that no longer lives, is removed before anything is made.
func Hosts(t testing.TB, n int) []*Host {
	t.Helper()
	if os.Geteuid() != 0 {
		skipOrFatal(t, "test hosts need root (network namespaces, veths, a bridge)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		skipOrFatal(t, "test hosts need iproute2's ip: apt-get install iproute2")
	}
	if n < 1 || n > 200 {
		t.Fatalf("Hosts: n = %d, want 1..200", n)
	}
	base := "rab" + strconv.FormatInt(int64(os.Getpid()), 36) + "-" + strconv.FormatInt(hostsCalls.Add(1)-1, 36)
	bridge := base
	hosts := make([]*Host, n)
	for i := range hosts {
		hosts[i] = &Host{
			Name: "h" + strconv.Itoa(i),
			NS:   fmt.Sprintf("%s-h%d", base, i),
			Link: fmt.Sprintf("%s-v%d", base, i),
		}
		if len(hosts[i].Link) > 15 {
			t.Fatalf("Hosts: interface name %q is longer than 15 bytes", hosts[i].Link)
		}
	}

	// Registered before anything is made, so that a Fatal half way
	// through still removes what was made.
	t.Cleanup(func() { removeHosts(t, bridge, hosts) })

	unlock := lockNetns(t)
	defer unlock()
	sweepNetns()
	// Leftovers under exactly these names (a crashed run whose pid came
	// back): deleting a veth deletes its peer too.
	for _, h := range hosts {
		ipQuiet("link", "del", h.Link)
		ipQuiet("netns", "del", h.NS)
	}
	ipQuiet("link", "del", bridge)

	subnet := freeSubnet(t)
	octets := subnet.Addr().As4()
	addr := func(last int) string {
		return netip.AddrFrom4([4]byte{octets[0], octets[1], octets[2], byte(last)}).String()
	}
	ip(t, "link", "add", "name", bridge, "type", "bridge")
	ip(t, "addr", "add", addr(1)+"/24", "dev", bridge)
	ip(t, "link", "set", bridge, "up")
	// The address is on the bridge: other processes see the subnet taken.
	unlock()

	for i, h := range hosts {
		h.Addr = addr(10 + i)
		ip(t, "netns", "add", h.NS)
		// The peer is made inside the namespace, so eth0 never clashes
		// with a name in the root namespace.
		ip(t, "link", "add", h.Link, "type", "veth", "peer", "name", "eth0", "netns", h.NS)
		ip(t, "link", "set", h.Link, "master", bridge)
		ip(t, "link", "set", h.Link, "up")
		ip(t, "-n", h.NS, "link", "set", "lo", "up")
		ip(t, "-n", h.NS, "addr", "add", h.Addr+"/24", "dev", "eth0")
		ip(t, "-n", h.NS, "link", "set", "eth0", "up")
		ip(t, "-n", h.NS, "route", "add", "default", "via", addr(1))
	}
	for _, h := range hosts {
		h.waitForwarding(t)
	}
	return hosts
}

// Command returns a command that runs name with args inside the host's
// network namespace, as `ip netns exec <NS> name args...`. ip sets up the
// namespace (and a private mount namespace with the namespace's /sys) and
// then execs the program in place, without forking: once started,
// cmd.Process.Pid is the program's own pid, so cmd.Process.Kill (or a
// signal to that pid) ends the program itself. Its children are not
// ended with it; set SysProcAttr.Setpgid and signal the group for that.
func (h *Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Cut takes the host's root-side veth down: the host is cut off from the
// bridge, so from the root namespace and every other host; packets to it
// are dropped, so connections to it time out rather than being refused.
func (h *Host) Cut(t testing.TB) {
	t.Helper()
	ip(t, "link", "set", h.Link, "down")
}

// Restore brings the host's root-side veth back up after Cut and returns
// once the bridge forwards to it again.
func (h *Host) Restore(t testing.TB) {
	t.Helper()
	ip(t, "link", "set", h.Link, "up")
	h.waitForwarding(t)
}

// waitForwarding waits until the root-side veth is up with its peer and
// its bridge port forwards (STP is off, so that is at once in practice).
func (h *Host) waitForwarding(t testing.TB) {
	t.Helper()
	dir := filepath.Join("/sys/class/net", h.Link)
	deadline := time.Now().Add(5 * time.Second)
	for {
		oper, _ := os.ReadFile(filepath.Join(dir, "operstate"))
		state, _ := os.ReadFile(filepath.Join(dir, "brport", "state"))
		if strings.TrimSpace(string(oper)) == "up" && strings.TrimSpace(string(state)) == "3" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %s not forwarding after 5s (operstate %q, bridge port state %q)",
				h.Name, h.Link, bytes.TrimSpace(oper), bytes.TrimSpace(state))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func skipOrFatal(t testing.TB, msg string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(msg + "; CI must run the network tests")
	}
	t.Skip(msg)
}

// ip runs `ip args...` and fails the test on an error.
func ip(t testing.TB, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return string(out)
}

// ipQuiet runs `ip args...` for what may not exist: errors are returned,
// not reported.
func ipQuiet(args ...string) error {
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// removeHosts deletes the veths (with their peers), the namespaces and the
// bridge, and reports whatever is still there afterwards.
func removeHosts(t testing.TB, bridge string, hosts []*Host) {
	for _, h := range hosts {
		ipQuiet("link", "del", h.Link)
		ipQuiet("netns", "del", h.NS)
	}
	ipQuiet("link", "del", bridge)
	for _, h := range hosts {
		if linkExists(h.Link) {
			t.Errorf("testenv: veth %s still exists after cleanup", h.Link)
		}
		if _, err := os.Stat(filepath.Join("/run/netns", h.NS)); err == nil {
			t.Errorf("testenv: namespace %s still exists after cleanup", h.NS)
		}
	}
	if linkExists(bridge) {
		t.Errorf("testenv: bridge %s still exists after cleanup", bridge)
	}
}

func linkExists(name string) bool {
	_, err := os.Lstat(filepath.Join("/sys/class/net", name))
	return err == nil
}

// lockNetns takes a lock shared by every test process of the machine, so
// that two packages' tests do not pick the same subnet at once. The
// returned function releases it and may be called more than once.
func lockNetns(t testing.TB) (unlock func()) {
	t.Helper()
	netnsLock.Lock()
	dir := "/run/lock"
	if _, err := os.Stat(dir); err != nil {
		dir = os.TempDir()
	}
	f, err := os.OpenFile(filepath.Join(dir, "redis-agent-testenv-netns.lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		netnsLock.Unlock()
		t.Fatalf("testenv: lock file: %v", err)
	}
	for {
		err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
		if !errors.Is(err, syscall.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		netnsLock.Unlock()
		t.Fatalf("testenv: lock: %v", err)
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			f.Close() // releases the flock
			netnsLock.Unlock()
		})
	}
}

var (
	leftoverLink = regexp.MustCompile(`^rab([0-9a-z]+)-[0-9a-z]+(-v[0-9]+)?$`)
	leftoverNS   = regexp.MustCompile(`^rab([0-9a-z]+)-[0-9a-z]+-h[0-9]+$`)
)

// sweepNetns removes bridges, veths and namespaces named by Hosts for a
// process that no longer lives: what a killed test run left behind.
func sweepNetns() {
	dead := func(m []string) bool {
		if m == nil {
			return false
		}
		pid, err := strconv.ParseInt(m[1], 36, 64)
		if err != nil || pid <= 0 || pid > 1<<31-1 {
			return false
		}
		return errors.Is(syscall.Kill(int(pid), 0), syscall.ESRCH)
	}
	if ents, err := os.ReadDir("/sys/class/net"); err == nil {
		for _, e := range ents {
			if dead(leftoverLink.FindStringSubmatch(e.Name())) {
				ipQuiet("link", "del", e.Name())
			}
		}
	}
	if ents, err := os.ReadDir("/run/netns"); err == nil {
		for _, e := range ents {
			if dead(leftoverNS.FindStringSubmatch(e.Name())) {
				ipQuiet("netns", "del", e.Name())
			}
		}
	}
}

// freeSubnet picks a 10.a.b.0/24 (a in 64..254) that neither an address of
// the root namespace nor a route of length /16 or longer overlaps, starting
// from a place derived from the pid and the call number. Broader routes
// (10.0.0.0/8 and the like) are allowed: the bridge's /24 is more specific.
func freeSubnet(t testing.TB) netip.Prefix {
	t.Helper()
	var used []netip.Prefix
	var local []netip.Addr
	for _, line := range strings.Split(ip(t, "-o", "-4", "addr", "show"), "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "inet" {
				if p, err := netip.ParsePrefix(f[i+1]); err == nil {
					used = append(used, p.Masked())
					local = append(local, p.Addr())
				}
			}
		}
	}
	routeTypes := map[string]bool{"unicast": true, "local": true, "broadcast": true, "multicast": true,
		"throw": true, "unreachable": true, "prohibit": true, "blackhole": true, "nat": true, "anycast": true}
	for _, line := range strings.Split(ip(t, "-o", "-4", "route", "show", "table", "all"), "\n") {
		f := strings.Fields(line)
		if len(f) > 1 && routeTypes[f[0]] {
			f = f[1:]
		}
		if len(f) == 0 || f[0] == "default" {
			continue
		}
		dst := f[0]
		if !strings.Contains(dst, "/") {
			dst += "/32"
		}
		if p, err := netip.ParsePrefix(dst); err == nil {
			used = append(used, p.Masked())
		}
	}
	const slots = 191 * 256
	start := (os.Getpid()*16 + int(hostsCalls.Load())) % slots
	for k := range 4096 {
		s := (start + k) % slots
		cand := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(64 + s/256), byte(s % 256), 0}), 24)
		free := true
		for _, p := range used {
			if p.Bits() >= 16 && p.Overlaps(cand) {
				free = false
				break
			}
		}
		for _, a := range local {
			if cand.Contains(a) {
				free = false
				break
			}
		}
		if free {
			return cand
		}
	}
	t.Fatal("testenv: no free 10.x.y.0/24 for test hosts")
	return netip.Prefix{}
}
