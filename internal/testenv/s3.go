package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"
)

// VersityGWInstall is how CI gets the S3 server the backup tests run
// against.
const VersityGWInstall = "go install github.com/versity/versitygw/cmd/versitygw@v1.8.0"

// VersityGW returns the path of versitygw, the Versity S3 gateway: from
// PATH, else $GOBIN or $GOPATH/bin (where go install puts it). Without it
// the test is skipped on a developer's machine and fails under CI.
func VersityGW(t testing.TB) string {
	t.Helper()
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	var dirs []string
	if d := os.Getenv("GOBIN"); d != "" {
		dirs = append(dirs, d)
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		for _, d := range filepath.SplitList(string(trimNL(out))) {
			dirs = append(dirs, filepath.Join(d, "bin"))
		}
	}
	if home, err := os.UserHomeDir(); err == nil {
		dirs = append(dirs, filepath.Join(home, "go", "bin"))
	}
	for _, d := range dirs {
		p := filepath.Join(d, "versitygw")
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("versitygw not installed (" + VersityGWInstall + "); CI must run the backup tests against a real S3 server")
	}
	t.Skip("versitygw not installed: " + VersityGWInstall)
	return ""
}

func trimNL(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r') {
		b = b[:len(b)-1]
	}
	return b
}

// S3 is a Versity S3 gateway on loopback with a posix backend, serving
// one bucket, for the tests of backups.
type S3 struct {
	t      testing.TB
	bin    string
	Dir    string // the backend: <Dir>/<bucket>/<key> are the objects
	Port   int
	Bucket string
	Access string
	Secret string
	cmd    *exec.Cmd
	done   chan struct{}
}

// StartS3 starts a gateway with a bucket "backups" and stops it at the
// end of the test.
func StartS3(t testing.TB) *S3 {
	t.Helper()
	s := &S3{t: t, bin: VersityGW(t), Dir: t.TempDir(), Port: FreePort(t), Bucket: "backups",
		Access: "testaccesskey", Secret: "testsecretkey0123456789"}
	// posix: a bucket is a directory of the backend.
	if err := os.Mkdir(filepath.Join(s.Dir, s.Bucket), 0o755); err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Stop)
	return s
}

// Endpoint is the gateway's URL.
func (s *S3) Endpoint() string { return "http://" + s.Addr() }

// Addr is its host:port.
func (s *S3) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.Port)) }

// Start starts the gateway (again, on the same port and directory) and
// waits until it accepts connections.
func (s *S3) Start() {
	s.t.Helper()
	if s.cmd != nil {
		s.t.Fatal("S3 gateway already running")
	}
	cmd := exec.Command(s.bin, "--port", s.Addr(), "posix", s.Dir)
	cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.Access, "ROOT_SECRET_KEY="+s.Secret)
	logf, err := os.OpenFile(filepath.Join(os.TempDir(), fmt.Sprintf("versitygw-%d.log", s.Port)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err == nil {
		cmd.Stdout, cmd.Stderr = logf, logf
		defer logf.Close()
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("start versitygw: %v", err)
	}
	s.cmd, s.done = cmd, make(chan struct{})
	go func() { cmd.Wait(); close(s.done) }()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for {
		c, err := net.DialTimeout("tcp", s.Addr(), 200*time.Millisecond)
		if err == nil {
			c.Close()
			return
		}
		select {
		case <-s.done:
			s.cmd = nil
			s.t.Fatalf("versitygw exited at start (log in %s)", filepath.Join(os.TempDir(), fmt.Sprintf("versitygw-%d.log", s.Port)))
		case <-ctx.Done():
			s.Stop()
			s.t.Fatalf("versitygw does not accept connections on %s", s.Addr())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Stop kills the gateway (SIGKILL: as a server that goes away does) and
// waits until it is gone. Idempotent.
func (s *S3) Stop() {
	if s.cmd == nil {
		return
	}
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	<-s.done
	s.cmd = nil
}

// Running reports whether the gateway runs.
func (s *S3) Running() bool { return s.cmd != nil }
