package agent

import (
	"context"
	"fmt"
	"net"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/redis-agent/redis-agent/internal/testenv"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
	"github.com/redis-agent/redis-agent/supervisor"
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
	port := testenv.Ports(b, 1)
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

// BenchmarkScrape1000 measures a /metrics scrape with 1000 instances: the
// collector reads supervisor status and cached INFO from memory and the
// records' usage from the state file; no instance is contacted.
func BenchmarkScrape1000(b *testing.B) {
	cfg := testConfig(b, 1000)
	reg := prometheus.NewRegistry()
	cfg.Registerer = reg
	s, err := New(cfg)
	if err != nil {
		b.Fatal(err)
	}
	defer s.store.Close()
	for i := range 1000 {
		id := fmt.Sprintf("inst-%04d", i)
		_, err := s.store.Create(state.Instance{ID: id, MemoryMB: 64, Phase: state.PhaseActive}, func(u state.Usage) (int, error) {
			return s.alloc.Next(u.PortHeld)
		})
		if err != nil {
			b.Fatal(err)
		}
		in := &instance{sup: supervisor.New(supervisor.Config{Admin: redis.NewAdmin("127.0.0.1", 1, "x")})}
		in.stats.Store(&instanceStats{ok: true, rss: 12 << 20, cpu: 1.5, info: redis.Info{
			UptimeSeconds: 100, UsedMemory: 1 << 20, MaxMemory: 64 << 20, DBKeys: map[string]float64{"db0": 10},
			RDBLastBgsaveOK: true, AOFLastWriteOK: true,
		}})
		s.instances[id] = in
	}
	h := promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
	req := httptest.NewRequest("GET", "/metrics", nil)
	var size int
	for b.Loop() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		size = w.Body.Len()
	}
	b.ReportMetric(float64(size), "bytes/scrape")
}
