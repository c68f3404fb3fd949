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
// (p50, p99) while six other instances each run a CPU-bound Lua loop,
// three times as many as this machine has cores: once with the default
// CPU shares only, once with a hard cap of a tenth of a core per instance
// (--cpu-quota 0.1). Needs root and cgroups. Run with
//
//	go test -run '^$' -bench NeighbourLatency -benchtime 20000x ./agent/
func BenchmarkNeighbourLatency(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("cgroups need root")
	}
	for _, quota := range []float64{0, 0.1} {
		name := "no-cpu-cap"
		if quota > 0 {
			name = "cpu-cap-0.1"
		}
		b.Run(name, func(b *testing.B) {
			busy := []string{"busy1", "busy2", "busy3", "busy4", "busy5", "busy6"}
			cfg := testConfig(b, len(busy)+1)
			cfg.CPUQuota = quota
			s := startService(b, cfg)
			if !cgroupsOn(s) {
				b.Skip("cgroups unavailable")
			}
			ctx := context.Background()
			for _, id := range append([]string{"quiet"}, busy...) {
				if _, _, err := s.Provision(ctx, id, Spec{MemoryMB: 16, Persistence: "none"}); err != nil {
					b.Fatal(err)
				}
			}
			stop := make(chan struct{})
			var wg sync.WaitGroup
			for _, id := range busy {
				cr, _, err := s.Bind(ctx, id, "app", "")
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
			qc, _, err := s.Bind(ctx, "quiet", "app", "")
			if err != nil {
				b.Fatal(err)
			}
			q := client(b, qc.Port, qc.Username, qc.Password)
			q.Ping(ctx)
			time.Sleep(300 * time.Millisecond) // the loops are running
			busyCPU := func() float64 {
				var sum float64
				for _, id := range busy {
					_, cpu := procUsage(mustGet(b, s, id).PID)
					sum += cpu
				}
				return sum
			}
			cpu0, t0 := busyCPU(), time.Now()
			var lat []time.Duration
			for b.Loop() {
				t0 := time.Now()
				if err := q.Ping(ctx).Err(); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			// How many cores the busy instances really used meanwhile: the
			// figure that shows whether the load was there and the cap held.
			b.ReportMetric((busyCPU()-cpu0)/time.Since(t0).Seconds(), "busy-cores")
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
