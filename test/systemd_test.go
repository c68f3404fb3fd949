package test

import (
	"net"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// The agent speaks sd_notify: READY=1 once reconcile is done and the API
// listens, STATUS= with instance counts, WATCHDOG=1 when WATCHDOG_USEC asks
// for it, STOPPING=1 on SIGTERM.
func TestSystemdNotify(t *testing.T) {
	testenv.RedisServer(t)
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	listen := "127.0.0.1:" + strconv.Itoa(testenv.FreePort(t))
	portMin := testenv.Ports(t, 10)
	cmd := exec.Command(agentBin, "--listen", listen, "--data-dir", testenv.TraversableDir(t),
		"--port-min", strconv.Itoa(portMin), "--port-max", strconv.Itoa(portMin+9))
	cmd.Env = append(cmd.Environ(), "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=200000")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Kill()
		<-exited
	}()

	var got []string
	want := func(prefix string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		buf := make([]byte, 4096)
		for {
			for _, m := range got {
				if strings.HasPrefix(m, prefix) {
					return
				}
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %q notification; got %q", prefix, got)
			}
			conn.SetReadDeadline(deadline)
			n, err := conn.Read(buf)
			if err != nil {
				t.Fatalf("read notify socket: %v (got %q)", err, got)
			}
			got = append(got, strings.Split(string(buf[:n]), "\n")...)
		}
	}
	want("READY=1")
	want("STATUS=0 instances")
	want("WATCHDOG=1")
	cmd.Process.Signal(syscall.SIGTERM)
	want("STOPPING=1")
	select {
	case <-exited:
		if waitErr != nil {
			t.Fatalf("agent exit after SIGTERM: %v", waitErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not exit after SIGTERM")
	}
}
