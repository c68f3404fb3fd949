package benchsuite

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// ioNeighbours measures what IO limits buy a quiet neighbour: an
// aof-always instance whose one client SETs small keys (each write
// fsynced before it is answered), its SET latency alone, then next to a
// noisy tenant that writes its IOMB data set out again and again (the
// agent's snapshot of it, a BGSAVE, in a loop: the IO of an AOF rewrite)
// while a writer overwrites its keys (its AOF grows and is rewritten),
// without an IO limit and with its writes limited to ioLimitMBs MiB/s
// (PATCH io, live), in alternating rounds of d each; and what the noisy
// tenant gets done on each side. Where the agent
// cannot limit IO (its io.note says why) it says so and measures nothing.
func (s *suite) ioNeighbours(ctx context.Context, mb, ioLimitMBs int, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	if ioLimitMBs <= 0 {
		ioLimitMBs = 20
	}
	s.logf("IO neighbours: a %d MiB noisy tenant next to an aof-always one, %v a side", mb, d)
	for id, spec := range map[string]string{"io-noisy": lifecycleSpec(mb, "aof"), "io-quiet": `{"memory_mb":16,"persistence":"aof-always"}`} {
		code, body, err := s.do("PUT", "/v1/instances/"+id, spec)
		if err != nil {
			return err
		}
		if code != 201 {
			return fmt.Errorf("PUT %s = %d %s", id, code, body)
		}
	}
	defer func() {
		s.remove("io-noisy")
		s.remove("io-quiet")
	}()
	noisy, err := s.get("io-noisy")
	if err != nil {
		return err
	}
	if noisy.IO == nil || noisy.IO.Note != "" || noisy.IO.Device == "" {
		s.logf("IO neighbours: skipped, the agent limits no IO here: %+v", noisy.IO)
		return nil
	}
	nc, err := s.bindApp("io-noisy")
	if err != nil {
		return err
	}
	qc, err := s.bindApp("io-quiet")
	if err != nil {
		return err
	}
	cn, cq := nc.client(), qc.client()
	defer cn.Close()
	defer cq.Close()
	keys := mb << 20 / valueSize
	if err := fill(ctx, cn, keys); err != nil {
		return fmt.Errorf("fill: %w", err)
	}
	setIO := func(body string) error {
		code, b, err := s.do("PATCH", "/v1/instances/io-noisy", body)
		if err == nil && code != 200 {
			err = fmt.Errorf("PATCH io-noisy %s = %d %s", body, code, b)
		}
		return err
	}
	// quiet SETs for d and returns their latencies.
	quiet := func() ([]time.Duration, error) {
		var lat []time.Duration
		for end := time.Now().Add(d); time.Now().Before(end); {
			t0 := time.Now()
			if err := cq.Set(ctx, "q:"+strconv.Itoa(len(lat)%1000), "v", 0).Err(); err != nil {
				return nil, err
			}
			lat = append(lat, time.Since(t0))
		}
		return lat, nil
	}
	// noise runs the noisy tenant's snapshots and overwrites until stop,
	// and counts the snapshots done and the bytes overwritten (what the
	// limit costs it: its snapshots wait for the AOF rewrites the
	// overwrites start, so their count says little).
	noise := func(stop <-chan struct{}) (wait func() (snaps, written int64, err error)) {
		nctx, cancel := context.WithCancel(ctx)
		go func() { <-stop; cancel() }()
		var wg sync.WaitGroup
		var snaps, written atomic.Int64
		var firstErr atomic.Pointer[error]
		fail := func(err error) { firstErr.CompareAndSwap(nil, &err) }
		wg.Add(2)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequestWithContext(nctx, "GET", s.agent.base+"/v1/instances/io-noisy/snapshot", nil)
				resp, err := s.client.Do(req)
				if err != nil {
					if nctx.Err() == nil {
						fail(err)
					}
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					snaps.Add(1)
				}
			}
		}()
		go func() {
			defer wg.Done()
			val := make([]byte, valueSize)
			for i := 0; ; i += 100 {
				select {
				case <-stop:
					return
				default:
				}
				p := cn.Pipeline()
				for j := i; j < i+100; j++ {
					rand.Read(val)
					p.Set(nctx, "key:"+strconv.Itoa(j%keys), val, 0)
				}
				if _, err := p.Exec(nctx); err != nil {
					if nctx.Err() == nil {
						fail(err)
					}
					return
				}
				written.Add(100 * valueSize)
			}
		}()
		return func() (int64, int64, error) {
			wg.Wait()
			if p := firstErr.Load(); p != nil {
				return 0, 0, *p
			}
			return snaps.Load(), written.Load(), nil
		}
	}
	alone, err := quiet()
	if err != nil {
		return err
	}
	var free, limited []time.Duration
	var freeBytes, limitedBytes int64
	for round := range 2 {
		for _, limit := range []bool{false, true} {
			body := `{"io":{}}`
			if limit {
				body = fmt.Sprintf(`{"io":{"write_bps":%d}}`, ioLimitMBs<<20)
			}
			if err := setIO(body); err != nil {
				return err
			}
			s.logf("IO neighbours: round %d, noisy tenant limited: %v", round+1, limit)
			stop := make(chan struct{})
			wait := noise(stop)
			time.Sleep(d / 10) // the noise under way
			lat, err := quiet()
			close(stop)
			_, w, nerr := wait()
			if err != nil {
				return err
			}
			if nerr != nil {
				return fmt.Errorf("noisy tenant: %w", nerr)
			}
			if limit {
				limited, limitedBytes = append(limited, lat...), limitedBytes+w
			} else {
				free, freeBytes = append(free, lat...), freeBytes+w
			}
		}
	}
	if err := setIO(`{"io":{}}`); err != nil {
		return err
	}
	s.add(Row{Figure: "quiet aof-always neighbour's SET, alone, p50", Value: ms(pct(alone, 50)), Unit: "ms"})
	s.add(Row{Figure: "quiet aof-always neighbour's SET, alone, p99", Value: ms(pct(alone, 99)), Unit: "ms"})
	for _, p := range []int{50, 99} {
		s.add(Row{Figure: fmt.Sprintf("  next to a noisy %d MiB tenant (snapshot loop + overwrites), no IO limit, p%d", mb, p), Value: ms(pct(free, p)), Unit: "ms",
			Reference: ms(pct(alone, p)), Aim: "ref: alone"})
		s.add(Row{Figure: fmt.Sprintf("  the noisy tenant's writes limited to %d MiB/s, p%d", ioLimitMBs, p), Value: ms(pct(limited, p)), Unit: "ms",
			Reference: ms(pct(free, p)), Aim: "ref: no IO limit"})
	}
	side := 2 * (d + d/10).Seconds()
	s.add(Row{Figure: "  noisy tenant's overwrites, limited", Value: float64(limitedBytes) / (1 << 20) / side, Unit: "MiB/s",
		Reference: float64(freeBytes) / (1 << 20) / side, Aim: "ref: no IO limit"})
	return nil
}
