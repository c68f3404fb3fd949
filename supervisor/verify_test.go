package supervisor

import (
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

func TestParseListeners(t *testing.T) {
	table := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3E80 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 100 0 0 10 0
   1: 0100007F:3E80 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000 100 0 0 10 0
`
	l := Listeners{}
	parseListeners(table, l)
	if len(l) != 1 || l[4242] != 16000 {
		t.Fatalf("parseListeners = %v; want only inode 4242 on 16000 (an established row and an inode 0 are not listeners)", l)
	}
}

// readPort waits for the fake "listen" server in dir to write its port.
func readPort(t *testing.T, dir string) int {
	t.Helper()
	var port int
	testenv.Eventually(t, "the fake server to write its port", 5*time.Second, func() bool {
		b, err := os.ReadFile(filepath.Join(dir, "port"))
		if err != nil {
			return false
		}
		port, err = strconv.Atoi(string(b))
		return err == nil
	})
	return port
}

// A process is adopted only when it is the redis-server binary, names the
// config and listens on the port: a look-alike fails each check.
func TestVerifyServer(t *testing.T) {
	s, _, _ := newSup(t, "listen", &fakeAdmin{}, nil)
	p := waitState(t, s, Running, 5*time.Second).Process
	port := readPort(t, s.cfg.Dir)
	ls, err := ReadListeners()
	if err != nil {
		t.Fatal(err)
	}
	self := []string{os.Args[0]}
	if err := VerifyServer(p, "fake:listen", self, port, ls); err != nil {
		t.Fatalf("the real thing: %v", err)
	}
	for name, err := range map[string]error{
		"another port":   VerifyServer(p, "fake:listen", self, port+1, ls),
		"another binary": VerifyServer(p, "fake:listen", []string{"/bin/sh"}, port, ls),
		"another config": VerifyServer(p, "fake:other", self, port, ls),
	} {
		if !IsGone(err) {
			t.Errorf("%s: VerifyServer = %v, want a not-ours error", name, err)
		}
	}

	// `sh -c '...' fake:listen` has a title that names the config (like
	// `tail -f redis.conf`), and is another executable.
	look := exec.Command("/bin/sh", "-c", "sleep 30", "fake:listen")
	if err := look.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { look.Process.Kill(); look.Wait() })
	var lp Process
	waitFor := time.Now().Add(5 * time.Second)
	for {
		if lp, err = identify(look.Process.Pid); err == nil && Verify(lp, "fake:listen") == nil {
			break
		}
		if time.Now().After(waitFor) {
			t.Fatalf("the look-alike's title never named the config: %q", cmdline(look.Process.Pid))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := VerifyServer(lp, "fake:listen", self, port, ls); !IsGone(err) {
		t.Fatalf("a shell whose title names the config: VerifyServer = %v, want a not-ours error", err)
	}
}

// A binary deleted or replaced since the process started (a package
// upgrade in place) still verifies by its path.
func TestVerifyServerDeletedBinary(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "redis-server")
	src, err := os.Open(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	dst, err := os.OpenFile(bin, os.O_CREATE|os.O_WRONLY, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(dst, src)
	src.Close()
	dst.Close()
	s, _, _ := newSup(t, "listen", &fakeAdmin{}, func(c *Config) { c.Binary = bin })
	p := waitState(t, s, Running, 5*time.Second).Process
	port := readPort(t, s.cfg.Dir)
	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755) // the upgrade's new file
	ls, _ := ReadListeners()
	if err := VerifyServer(p, "fake:listen", []string{bin}, port, ls); err != nil {
		t.Fatalf("process of a replaced binary: %v", err)
	}
}
