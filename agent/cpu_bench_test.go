package agent

import (
	"context"
	"os"
	"sort"
	"sync"
	"testing"
	"time"
)

// BenchmarkNeighbourLatency measures a quiet instance's PING latency
// (p50, p99) while two other instances each run a CPU-bound Lua loop that,
// together, would take both cores of this machine: once with the default
// CPU shares only, once with a hard cap of a quarter core per instance
// (--cpu-quota 0.25). Needs root and cgroups. Run with
//
//	go test -run '^$' -bench NeighbourLatency -benchtime 3000x ./agent/
func BenchmarkNeighbourLatency(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("cgroups need root")
	}
	for _, quota := range []float64{0, 0.25} {
		name := "no-cpu-cap"
		if quota > 0 {
			name = "cpu-cap-0.25"
		}
		b.Run(name, func(b *testing.B) {
			cfg := testConfig(b, 3)
			cfg.CPUQuota = quota
			s := startService(b, cfg)
			if s.cg == nil {
				b.Skip("cgroups unavailable")
			}
			ctx := context.Background()
			for _, id := range []string{"quiet", "busy1", "busy2"} {
				if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 16, Persistence: "none"}); err != nil {
					b.Fatal(err)
				}
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for _, id := range []string{"busy1", "busy2"} {
				cr, _, err := s.Bind(ctx, id, "app")
				if err != nil {
					b.Fatal(err)
				}
				c := client(b, cr.Port, cr.Username, cr.Password)
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						select {
						case <-stop:
							return
						default:
						}
						// ~1 s of pure CPU per call, under busy-reply-threshold.
						c.Eval(ctx, "local x = 0 for i = 1, 30000000 do x = x + i end return 1", nil)
					}
				}()
			}
			defer func() { close(stop); wg.Wait() }()
			qc, _, err := s.Bind(ctx, "quiet", "app")
			if err != nil {
				b.Fatal(err)
			}
			q := client(b, qc.Port, qc.Username, qc.Password)
			q.Ping(ctx)
			time.Sleep(300 * time.Millisecond) // the loops are running
			var lat []time.Duration
			for b.Loop() {
				t0 := time.Now()
				if err := q.Ping(ctx).Err(); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
