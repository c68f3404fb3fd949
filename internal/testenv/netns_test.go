package testenv

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/procfs"
)

// The test binary re-runs itself inside a host, as a tiny TCP echo server
// or a one-shot dialer, when this variable names the role.
const (
	roleEnv = "TESTENV_NETNS_ROLE" // "echo" or "dial"
	addrEnv = "TESTENV_NETNS_ADDR" // host:port to listen on or dial
)

const echoPort = "7070"

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "echo":
		os.Exit(echoServer(os.Getenv(addrEnv)))
	case "dial":
		os.Exit(dialOnce(os.Getenv(addrEnv)))
	}
	os.Exit(m.Run())
}

// echoServer listens on addr, prints "ready", and echoes each line back on
// every connection. It exits when its standard input closes (the test is
// gone) or when it is killed.
func echoServer(addr string) int {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Println("listen:", err)
		return 1
	}
	fmt.Println("ready")
	go func() {
		io.Copy(io.Discard, os.Stdin)
		os.Exit(0)
	}()
	for {
		c, err := l.Accept()
		if err != nil {
			return 1
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(10 * time.Second))
			io.Copy(c, c)
		}()
	}
}

// dialOnce connects to addr within a second, sends a line and prints what
// comes back; exit status 0 only when the echo came back.
func dialOnce(addr string) int {
	line, err := ping(addr, time.Second)
	if err != nil {
		fmt.Println("dial:", err)
		return 1
	}
	fmt.Println("echo:", line)
	return 0
}

// ping dials addr, writes "ping" and returns the echoed line.
func ping(addr string, timeout time.Duration) (string, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// startEcho runs the echo server in h, waits until it listens, and kills
// it at the end of the test.
func startEcho(t *testing.T, h *Host) *exec.Cmd {
	t.Helper()
	cmd := h.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=echo", addrEnv+"="+net.JoinHostPort(h.Addr, echoPort))
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		stdin.Close()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Errorf("echo server in %s did not exit after kill", h.Name)
		}
	})
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- strings.TrimSpace(line)
		io.Copy(io.Discard, stdout)
	}()
	select {
	case line := <-ready:
		if line != "ready" {
			t.Fatalf("echo server in %s: %q", h.Name, line)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("echo server in %s not ready after 10s", h.Name)
	}
	return cmd
}

// dialFrom runs the dialer in h against addr and returns its output and
// whether the echo came back.
func dialFrom(t *testing.T, h *Host, addr string) (string, bool) {
	t.Helper()
	cmd := h.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), roleEnv+"=dial", addrEnv+"="+addr)
	out, err := cmd.CombinedOutput()
	var exit *exec.ExitError
	if err != nil && !errors.As(err, &exit) {
		t.Fatalf("dialer in %s: %v", h.Name, err)
	}
	return strings.TrimSpace(string(out)), err == nil
}

func netNS(pid int) (string, error) {
	return os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
}

func TestHosts(t *testing.T) {
	var hosts []*Host
	var bridge string
	t.Run("network", func(t *testing.T) {
		hosts = Hosts(t, 2)
		h0, h1 := hosts[0], hosts[1]
		for _, h := range hosts {
			t.Logf("%s: ns %s addr %s link %s", h.Name, h.NS, h.Addr, h.Link)
		}
		master, err := os.Readlink(filepath.Join("/sys/class/net", h0.Link, "master"))
		if err != nil {
			t.Fatalf("%s has no bridge: %v", h0.Link, err)
		}
		bridge = filepath.Base(master)
		if m1, _ := os.Readlink(filepath.Join("/sys/class/net", h1.Link, "master")); filepath.Base(m1) != bridge {
			t.Fatalf("%s on bridge %q, %s on %q", h0.Link, bridge, h1.Link, filepath.Base(m1))
		}

		echo := startEcho(t, h0)
		// ip netns exec execs the program: the pid is the test binary's
		// own, running in h0's namespace, not in ours.
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", echo.Process.Pid))
		if err != nil {
			t.Fatal(err)
		}
		self, _ := os.Executable()
		if exe != self {
			t.Errorf("pid %d runs %s, want the test binary %s", echo.Process.Pid, exe, self)
		}
		theirs, err := netNS(echo.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		ours, _ := netNS(os.Getpid())
		if theirs == ours {
			t.Errorf("echo server runs in the root network namespace (%s)", ours)
		}

		target := net.JoinHostPort(h0.Addr, echoPort)
		if line, err := ping(target, time.Second); err != nil || line != "ping" {
			t.Fatalf("root -> %s: %q, %v", target, line, err)
		}
		if out, ok := dialFrom(t, h1, target); !ok || out != "echo: ping" {
			t.Fatalf("%s -> %s: %s", h1.Name, target, out)
		}

		h0.Cut(t)
		start := time.Now()
		_, err = ping(target, time.Second)
		took := time.Since(start)
		var ne net.Error
		if err == nil || !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("root -> %s after Cut: %v, want a timeout", target, err)
		}
		if took > 1500*time.Millisecond {
			t.Errorf("dial after Cut took %v, want about 1s", took)
		}
		t.Logf("after Cut: %v in %v", err, took.Round(time.Millisecond))
		if out, ok := dialFrom(t, h1, target); ok {
			t.Fatalf("%s -> %s after Cut still works: %s", h1.Name, target, out)
		} else {
			t.Logf("%s after Cut: %s", h1.Name, out)
		}

		h0.Restore(t)
		if line, err := ping(target, 2*time.Second); err != nil || line != "ping" {
			t.Fatalf("root -> %s after Restore: %q, %v", target, line, err)
		}
		if out, ok := dialFrom(t, h1, target); !ok || out != "echo: ping" {
			t.Fatalf("%s -> %s after Restore: %s", h1.Name, target, out)
		}

		// Killing the pid Command started ends the server itself.
		if err := echo.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for syscall.Kill(echo.Process.Pid, 0) == nil && !exited(echo.Process.Pid) {
			if time.Now().After(deadline) {
				t.Fatalf("echo server pid %d still alive after kill", echo.Process.Pid)
			}
			time.Sleep(20 * time.Millisecond)
		}
		if _, err := ping(target, time.Second); err == nil {
			t.Fatalf("root -> %s answers after the server was killed", target)
		}
	})
	if len(hosts) == 0 {
		return // skipped, or failed before Hosts returned
	}
	assertGone(t, bridge, hosts)
}

// exited reports whether pid is a zombie or gone (the Wait goroutine may
// not have reaped it yet).
func exited(pid int) bool {
	st, err := procfs.ReadStat(pid)
	return err != nil || st.Gone()
}

// assertGone checks with ip that no namespace, veth or bridge of hosts is
// left.
func assertGone(t *testing.T, bridge string, hosts []*Host) {
	t.Helper()
	netns, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, netns)
	}
	links, err := exec.Command("ip", "-o", "link").CombinedOutput()
	if err != nil {
		t.Fatalf("ip -o link: %v: %s", err, links)
	}
	for _, h := range hosts {
		if strings.Contains(string(netns), h.NS) {
			t.Errorf("namespace %s left: %s", h.NS, netns)
		}
		if strings.Contains(string(links), h.Link) {
			t.Errorf("veth %s left", h.Link)
		}
	}
	if bridge == "" || strings.Contains(string(links), ": "+bridge+":") {
		t.Errorf("bridge %q left (or never seen)", bridge)
	}
}

// TestHostsLeftovers plants what a crashed run would leave: a bridge, veth
// and namespace under the names the next Hosts call uses, and under the
// names of a pid no process can have. Hosts must remove both and work.
func TestHostsLeftovers(t *testing.T) {
	if os.Geteuid() != 0 {
		skipOrFatal(t, "test hosts need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		skipOrFatal(t, "test hosts need iproute2's ip")
	}
	next := "rab" + strconv.FormatInt(int64(os.Getpid()), 36) + "-" + strconv.FormatInt(hostsCalls.Load(), 36)
	// Above the largest pid_max (1<<22), and unique to this process.
	dead := "rab" + strconv.FormatInt(int64(1<<22+os.Getpid()), 36) + "-0"
	// Planted under the lock, so that another test process's sweep does
	// not remove them half made (after, it may: they are to go anyway).
	unlock := lockNetns(t)
	for _, base := range []string{next, dead} {
		ipQuiet("link", "del", base)
		ipQuiet("link", "del", base+"-v0")
		ipQuiet("netns", "del", base+"-h0")
		ip(t, "link", "add", "name", base, "type", "bridge")
		ip(t, "netns", "add", base+"-h0")
		ip(t, "link", "add", base+"-v0", "type", "veth", "peer", "name", "eth0", "netns", base+"-h0")
		ip(t, "link", "set", base+"-v0", "master", base)
		b := base
		t.Cleanup(func() { // in case Hosts does not remove them
			ipQuiet("link", "del", b+"-v0")
			ipQuiet("netns", "del", b+"-h0")
			ipQuiet("link", "del", b)
		})
	}
	unlock()
	var hosts []*Host
	t.Run("hosts", func(t *testing.T) {
		hosts = Hosts(t, 1)
		if hosts[0].Link != next+"-v0" || hosts[0].NS != next+"-h0" {
			t.Fatalf("Hosts made %s / %s, want %s-v0 / %s-h0", hosts[0].Link, hosts[0].NS, next, next)
		}
		if linkExists(dead) || linkExists(dead+"-v0") {
			t.Errorf("leftover links of a dead pid %s not swept", dead)
		}
		if _, err := os.Stat("/run/netns/" + dead + "-h0"); err == nil {
			t.Errorf("leftover namespace %s-h0 not swept", dead)
		}
		startEcho(t, hosts[0])
		target := net.JoinHostPort(hosts[0].Addr, echoPort)
		if line, err := ping(target, time.Second); err != nil || line != "ping" {
			t.Fatalf("root -> %s: %q, %v", target, line, err)
		}
	})
	if len(hosts) == 0 {
		return
	}
	assertGone(t, next, hosts)
}
