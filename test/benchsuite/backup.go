package benchsuite

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// s3Server is a Versity S3 gateway on loopback, the backup target of the
// backup scenario.
type s3Server struct {
	cmd            *exec.Cmd
	addr           string
	bucket         string
	access, secret string
}

// startS3 runs versitygw with a posix backend under dir.
func startS3(bin, dir string) (*s3Server, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	s := &s3Server{addr: addr, bucket: "bench", access: "benchaccesskey", secret: "benchsecretkey0123456789"}
	if err := os.MkdirAll(filepath.Join(dir, s.bucket), 0o755); err != nil {
		return nil, err
	}
	s.cmd = exec.Command(bin, "--port", addr, "posix", dir)
	s.cmd.Env = append(os.Environ(), "ROOT_ACCESS_KEY="+s.access, "ROOT_SECRET_KEY="+s.secret)
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	for deadline := time.Now().Add(20 * time.Second); ; {
		if c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond); err == nil {
			c.Close()
			return s, nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("versitygw does not listen on %s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (s *s3Server) stop() {
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
	s.cmd.Wait()
}

// agentFlags and agentEnv point an agent at the gateway.
func (s *s3Server) agentFlags() []string {
	return []string{"--backup-endpoint", "http://" + s.addr, "--backup-bucket", s.bucket, "--backup-region", "us-east-1",
		"--backup-path-style", "--backup-schedule", "off", "--backup-agent-name", "bench"}
}

func (s *s3Server) agentEnv() []string {
	return []string{"AWS_ACCESS_KEY_ID=" + s.access, "AWS_SECRET_ACCESS_KEY=" + s.secret}
}

// backupScenario backs up the snapshot scenario's instance (id, still
// filled) to the local S3 server, next to that run's snapshot GET (out),
// and measures a tenant's GET latency during its backup next to without.
func (s *suite) backupScenario(ctx context.Context, id string, mib float64, out time.Duration) error {
	cr, err := s.bindApp(id)
	if err != nil {
		return err
	}
	c := cr.client()
	defer c.Close()
	// The tenant: GETs one after the other, each timed.
	probe := func(stop <-chan struct{}) []time.Duration {
		var ds []time.Duration
		for {
			select {
			case <-stop:
				return ds
			default:
			}
			t0 := time.Now()
			if err := c.Get(ctx, "k1").Err(); err != nil && err.Error() != "redis: nil" {
				return ds
			}
			ds = append(ds, time.Since(t0))
			time.Sleep(time.Millisecond)
		}
	}
	run := func(during func() error) ([]time.Duration, time.Duration, error) {
		stop := make(chan struct{})
		var ds []time.Duration
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); ds = probe(stop) }()
		t0 := time.Now()
		err := during()
		took := time.Since(t0)
		close(stop)
		wg.Wait()
		return ds, took, err
	}
	var took time.Duration
	during, took, err := run(func() error {
		code, body, err := s.do("POST", "/v1/instances/"+id+"/backups", "")
		if err == nil && code != 201 {
			err = fmt.Errorf("POST backups = %d %s", code, body)
		}
		return err
	})
	if err != nil {
		return err
	}
	without, _, _ := run(func() error { time.Sleep(max(took, time.Second)); return nil })
	s.add(Row{Figure: fmt.Sprintf("backup to a local S3 server (POST backups -> 201), %.0f MiB RDB", mib), Value: ms(took), Unit: "ms", Reference: ms(out), Aim: "ref: snapshot out (GET) above"})
	s.add(Row{Figure: "backup throughput", Value: mib / took.Seconds(), Unit: "MiB/s"})
	s.add(Row{Figure: "  tenant GET latency p99 during its backup", Value: ms(pct(during, 99)), Unit: "ms", Reference: ms(pct(without, 99)), Aim: "ref: without a backup"})
	// The same backup restored in place.
	var key struct {
		Backups []struct{ Key string } `json:"backups"`
	}
	if err := s.getJSON("/v1/instances/"+id+"/backups", &key); err != nil || len(key.Backups) == 0 {
		return fmt.Errorf("list backups: %v (%d)", err, len(key.Backups))
	}
	t0 := time.Now()
	code, body, err := s.do("PUT", "/v1/instances/"+id+"/snapshot?from_backup="+key.Backups[len(key.Backups)-1].Key, "")
	if err == nil && code != 200 {
		err = fmt.Errorf("restore from the backup = %d %s", code, body)
	}
	if err != nil {
		return err
	}
	s.add(Row{Figure: fmt.Sprintf("restore from that backup (PUT ?from_backup -> 200 ready), %.0f MiB", mib), Value: ms(time.Since(t0)), Unit: "ms"})
	return nil
}

func (s *suite) getJSON(path string, out any) error {
	code, body, err := s.do("GET", path, "")
	if err != nil {
		return err
	}
	if code != 200 {
		return fmt.Errorf("GET %s = %d %s", path, code, body)
	}
	return json.Unmarshal(body, out)
}
