package benchsuite

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"
)

// The data lifecycle scenarios: a snapshot of a SnapshotMB dataset out of
// one instance and its restore into another (a migration's two halves),
// each next to what a bare redis-server takes for the same RDB (SAVE, and
// a start that loads it); then a rolling upgrade of every instance to
// another redis-server file, with each instance's unavailability measured
// from outside by fresh-connection PINGs.

// valueSize is the size of one value of the snapshot dataset: random
// bytes, so the RDB is as large as the data.
const valueSize = 1024

// bin is the agent's redis-server: a symlink to the real one, which the
// rollout scenario points at a copy of it (another file: what a package
// upgrade does).
func (s *suite) bin() string { return filepath.Join(s.cfg.Dir, "bin", "redis-server") }

// linkBinary points the agent's redis-server symlink at target, atomically.
func (s *suite) linkBinary(target string) error {
	if err := os.MkdirAll(filepath.Dir(s.bin()), 0o755); err != nil {
		return err
	}
	tmp := s.bin() + ".new"
	os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	return os.Rename(tmp, s.bin())
}

// bindApp binds "app" to id and returns its address and credentials.
func (s *suite) bindApp(id string) (creds, error) {
	var c creds
	code, body, err := s.do("PUT", "/v1/instances/"+id+"/bindings/app", "")
	if err != nil {
		return c, err
	}
	if code != 201 && code != 200 {
		return c, fmt.Errorf("bind %s: %d %s", id, code, body)
	}
	return c, json.Unmarshal(body, &c)
}

func (c creds) addr() string { return net.JoinHostPort(c.Host, strconv.Itoa(c.Port)) }

func (c creds) client() *goredis.Client {
	return goredis.NewClient(&goredis.Options{Addr: c.addr(), Username: c.Username, Password: c.Password,
		DisableIdentity: true, MaxRetries: -1, PoolSize: 1, ReadTimeout: time.Minute, WriteTimeout: time.Minute})
}

// fill writes n keys of valueSize random bytes, 1000 per pipeline.
func fill(ctx context.Context, c *goredis.Client, n int) error {
	val := make([]byte, valueSize)
	for i := 0; i < n; i += 1000 {
		p := c.Pipeline()
		for j := i; j < min(i+1000, n); j++ {
			rand.Read(val)
			p.Set(ctx, "key:"+strconv.Itoa(j), val, 0)
		}
		if _, err := p.Exec(ctx); err != nil {
			return err
		}
	}
	return nil
}

// lifecycleSpec is an instance with room for mb of data and its overhead.
func lifecycleSpec(mb int, persistence string) string {
	return fmt.Sprintf(`{"memory_mb":%d,"persistence":%q}`, 2*mb+64, persistence)
}

// snapshotRestore measures GET and PUT /v1/instances/{id}/snapshot with a
// dataset of mb MiB, and the bare references.
func (s *suite) snapshotRestore(ctx context.Context, mb int) error {
	keys := mb << 20 / valueSize
	s.logf("snapshot and restore of %d MiB (%d keys)", mb, keys)
	for _, id := range []string{"snap-src", "snap-dst"} {
		code, body, err := s.do("PUT", "/v1/instances/"+id, lifecycleSpec(mb, "aof"))
		if err != nil {
			return err
		}
		if code != 201 {
			return fmt.Errorf("PUT %s = %d %s", id, code, body)
		}
	}
	src, err := s.bindApp("snap-src")
	if err != nil {
		return err
	}
	cs := src.client()
	defer cs.Close()
	if err := fill(ctx, cs, keys); err != nil {
		return fmt.Errorf("fill: %w", err)
	}

	rdb := filepath.Join(s.cfg.Dir, "lifecycle", "dump.rdb")
	if err := os.MkdirAll(filepath.Dir(rdb), 0o755); err != nil {
		return err
	}
	// A quiet source: the fill's AOF rewrite (the AOF grew past 64 MiB)
	// is over, as the bare SAVE has none to wait for.
	if err := waitPersistenceIdle(ctx, cs); err != nil {
		return err
	}
	dst, err := s.bindApp("snap-dst")
	if err != nil {
		return err
	}
	cd := dst.client()
	defer cd.Close()
	// Rounds of the four, alternating: on a busy machine no side gets the
	// quiet seconds alone. Each figure is the median of its rounds.
	var outs, ins, saves, loads []time.Duration
	var size int64
	for r := range snapshotRounds {
		s.logf("snapshot and restore, round %d of %d", r+1, snapshotRounds)
		t0 := time.Now()
		if size, err = s.download(s.agent.base, "snap-src", rdb); err != nil {
			return err
		}
		outs = append(outs, time.Since(t0))
		t0 = time.Now()
		if err := s.upload(s.agent.base, "snap-dst", rdb); err != nil {
			return err
		}
		ins = append(ins, time.Since(t0))
		if n, err := cd.DBSize(ctx).Result(); err != nil || n != int64(keys) {
			return fmt.Errorf("restored instance has %d keys (%v), want %d", n, err, keys)
		}
		if err := waitPersistenceIdle(ctx, cd); err != nil {
			return err
		}
		save, load, err := s.bareRDB(rdb, keys)
		if err != nil {
			return fmt.Errorf("bare reference: %w", err)
		}
		saves, loads = append(saves, save), append(loads, load)
	}
	out, in, save, load := pct(outs, 50), pct(ins, 50), pct(saves, 50), pct(loads, 50)
	mib := float64(size) / (1 << 20)
	s.snapOut, s.snapMiB = out, mib
	s.add(Row{Figure: fmt.Sprintf("snapshot out (GET), %.0f MiB RDB, median of %d", mib, snapshotRounds), Value: ms(out), Unit: "ms", Reference: ms(save), Aim: "<= 1.3x bare SAVE"})
	s.add(Row{Figure: "snapshot out throughput", Value: mib / out.Seconds(), Unit: "MiB/s"})
	s.add(Row{Figure: fmt.Sprintf("restore in (PUT -> 200 ready), %.0f MiB RDB, median of %d", mib, snapshotRounds), Value: ms(in), Unit: "ms", Reference: ms(load), Aim: "<= 2x bare start loading it"})
	s.add(Row{Figure: "restore in throughput", Value: mib / in.Seconds(), Unit: "MiB/s"})
	_, err = s.remove("snap-dst")
	return err
}

// snapshotRounds is how many times the snapshot scenario measures each of
// its four figures.
const snapshotRounds = 3

// waitPersistenceIdle waits until the instance c is bound to runs no
// save or AOF rewrite.
func waitPersistenceIdle(ctx context.Context, c *goredis.Client) error {
	deadline := time.Now().Add(5 * time.Minute)
	for {
		info, err := c.Info(ctx, "persistence").Result()
		if err != nil {
			return err
		}
		if !strings.Contains(info, "aof_rewrite_in_progress:1") && !strings.Contains(info, "aof_rewrite_scheduled:1") &&
			!strings.Contains(info, "rdb_bgsave_in_progress:1") {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("a save or AOF rewrite still runs after 5 minutes")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// download streams id's snapshot from the agent at base to path, checks
// its sha256 and returns its size. It takes the snapshot as it is made
// (TE: trailers: chunked, the sha256 in a trailer).
func (s *suite) download(base, id, path string) (int64, error) {
	req, err := http.NewRequest("GET", base+"/v1/instances/"+id+"/snapshot", nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("TE", "trailers")
	resp, err := s.client.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		return 0, fmt.Errorf("GET snapshot of %s = %d %s", id, resp.StatusCode, b)
	}
	f, err := os.Create(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(f, h), resp.Body)
	if err != nil {
		return 0, err
	}
	want := resp.Trailer.Get("X-Snapshot-Sha256")
	if want == "" {
		want = resp.Header.Get("X-Snapshot-Sha256")
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return 0, fmt.Errorf("snapshot sha256 %s, header says %q", got, want)
	}
	return n, f.Close()
}

// upload restores id on the agent at base from the RDB at path.
func (s *suite) upload(base, id, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	req, err := http.NewRequest("PUT", base+"/v1/instances/"+id+"/snapshot", f)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/octet-stream")
	resp, err := s.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		return fmt.Errorf("PUT snapshot of %s = %d %s", id, resp.StatusCode, b)
	}
	return nil
}

// bareRDB starts a bare redis-server on a copy of the RDB at path and
// times its start until PONG with the keys loaded, and a SAVE of them.
func (s *suite) bareRDB(path string, keys int) (save, load time.Duration, err error) {
	dir := filepath.Join(s.cfg.Dir, "bare", "rdb")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, 0, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, err
	}
	if err := os.WriteFile(filepath.Join(dir, "dump.rdb"), b, 0o644); err != nil {
		return 0, 0, err
	}
	port := s.barePort(0)
	conf, err := bareConf(dir, port)
	if err != nil {
		return 0, 0, err
	}
	addr := "127.0.0.1:" + strconv.Itoa(port)
	cmd := exec.Command(s.cfg.RedisServer, conf)
	t0 := time.Now()
	if err := cmd.Start(); err != nil {
		return 0, 0, err
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	for !resp(addr, "", "", "PING") {
		if time.Since(t0) > 2*time.Minute {
			return 0, 0, errors.New("no PONG in 2m")
		}
		time.Sleep(time.Millisecond)
	}
	load = time.Since(t0)
	c := goredis.NewClient(&goredis.Options{Addr: addr, DisableIdentity: true, MaxRetries: -1, ReadTimeout: time.Minute})
	defer c.Close()
	ctx := context.Background()
	if n, err := c.DBSize(ctx).Result(); err != nil || n != int64(keys) {
		return 0, 0, fmt.Errorf("bare redis-server loaded %d keys (%v), want %d", n, err, keys)
	}
	t0 = time.Now()
	if err := c.Save(ctx).Err(); err != nil {
		return 0, 0, err
	}
	return time.Since(t0), load, nil
}

// rollingUpgrade provisions n instances (AOF, some data each) beside the
// snapshot source, points the agent's redis-server at a copy of it and
// POSTs /v1/rollout; a prober per instance PINGs on fresh connections and
// records the longest gap between two answered PINGs.
func (s *suite) rollingUpgrade(ctx context.Context, n int) error {
	s.logf("rolling upgrade of %d instances (+ the snapshot source)", n)
	ids := []string{"snap-src"}
	for i := range n {
		id := fmt.Sprintf("roll-%d", i)
		if code, body, err := s.do("PUT", "/v1/instances/"+id, `{"memory_mb":16,"persistence":"aof"}`); err != nil || code != 201 {
			return fmt.Errorf("PUT %s = %d %s %v", id, code, body, err)
		}
		ids = append(ids, id)
	}
	all := make([]creds, len(ids))
	for i, id := range ids {
		c, err := s.bindApp(id)
		if err != nil {
			return err
		}
		all[i] = c
		if i > 0 {
			cl := c.client()
			err := fill(ctx, cl, 1024) // 1 MiB
			cl.Close()
			if err != nil {
				return err
			}
		}
	}

	next := filepath.Join(s.cfg.Dir, "bin", "redis-server-next")
	b, err := os.ReadFile(s.cfg.RedisServer)
	if err != nil {
		return err
	}
	if err := os.WriteFile(next, b, 0o755); err != nil {
		return err
	}
	if err := s.linkBinary(next); err != nil {
		return err
	}

	gaps := make([]time.Duration, len(ids))
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i, c := range all {
		wg.Add(1)
		go func() {
			defer wg.Done()
			last := time.Now()
			for {
				select {
				case <-stop:
					return
				default:
				}
				if resp(c.addr(), c.Username, c.Password, "PING") {
					now := time.Now()
					gaps[i] = max(gaps[i], now.Sub(last))
					last = now
				}
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	time.Sleep(100 * time.Millisecond) // every prober has answers before
	t0 := time.Now()
	var st struct {
		State                 string  `json:"state"`
		Moved                 int     `json:"moved"`
		Error                 string  `json:"error"`
		MaxUnavailableSeconds float64 `json:"max_unavailable_seconds"`
	}
	code, body, err := s.do("POST", "/v1/rollout", "")
	if err == nil && code != 202 {
		err = fmt.Errorf("POST /v1/rollout = %d %s", code, body)
	}
	for err == nil {
		if code, body, err = s.do("GET", "/v1/rollout", ""); err != nil {
			break
		}
		if err = json.Unmarshal(body, &st); err != nil || st.State != "running" {
			break
		}
		if time.Since(t0) > 10*time.Minute {
			err = errors.New("rollout still running after 10m")
		}
		time.Sleep(5 * time.Millisecond)
	}
	took := time.Since(t0)
	time.Sleep(100 * time.Millisecond) // every prober has answers after
	close(stop)
	wg.Wait()
	if err != nil {
		return err
	}
	if st.State != "done" || st.Moved != len(ids) {
		return fmt.Errorf("rollout ended %s with %d of %d moved: %s", st.State, st.Moved, len(ids), st.Error)
	}
	small := append([]time.Duration(nil), gaps[1:]...)
	s.add(Row{Figure: fmt.Sprintf("rolling upgrade of %d instances, total", len(ids)), Value: took.Seconds(), Unit: "s"})
	s.add(Row{Figure: "  unavailability per 1 MiB AOF instance, p50", Value: ms(pct(small, 50)), Unit: "ms"})
	s.add(Row{Figure: "  unavailability per 1 MiB AOF instance, max", Value: ms(pct(small, 100)), Unit: "ms"})
	s.add(Row{Figure: fmt.Sprintf("  unavailability of the %d MiB instance", s.cfg.SnapshotMB), Value: ms(gaps[0]), Unit: "ms"})
	s.add(Row{Figure: "  longest, as the agent measured it", Value: st.MaxUnavailableSeconds * 1000, Unit: "ms"})
	for _, id := range ids {
		if _, err := s.remove(id); err != nil {
			return err
		}
	}
	return nil
}
