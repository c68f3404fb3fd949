package agent

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis-agent/redis-agent/internal/testenv"
)

// BenchmarkProvision measures Provision from call to return, which is when
// the new redis-server answers PING as the admin user. Compare with
// BenchmarkBareRedisStart, the floor.
func BenchmarkProvision(b *testing.B) {
	cfg := testConfig(b, 4)
	s := startService(b, cfg)
	ctx := context.Background()
	i := 0
	for b.Loop() {
		i++
		id := "bench-" + strconv.Itoa(i)
		if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 16, Persistence: "aof"}); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		if err := s.Deprovision(ctx, id); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkBareRedisStart is the reference: exec redis-server with a
// minimal config and poll it (every millisecond) until it answers PING.
func BenchmarkBareRedisStart(b *testing.B) {
	bin := testenv.RedisServer(b)
	dir := testenv.TraversableDir(b)
	port := portBase + 990
	conf := filepath.Join(dir, "redis.conf")
	if err := os.WriteFile(conf, fmt.Appendf(nil, "port %d\nbind 127.0.0.1\ndir %s\nsave \"\"\nappendonly no\n", port, dir), 0o644); err != nil {
		b.Fatal(err)
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	for b.Loop() {
		cmd := exec.Command(bin, conf)
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		for !pingOnce(addr) {
			time.Sleep(time.Millisecond)
		}
		b.StopTimer()
		cmd.Process.Kill()
		cmd.Wait()
		b.StartTimer()
	}
}

func pingOnce(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	buf := make([]byte, 7)
	n, _ := c.Read(buf)
	return string(buf[:n]) == "+PONG\r\n"
}
