// Command bench runs the benchmark suite (package benchsuite) against the
// real agent and broker binaries and a bare redis-server, prints the table
// and writes it to docs/benchmarks.md. `make bench` runs it; -quick is the
// CI smoke.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/redis-agent/redis-agent/test/benchsuite"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

func run() error {
	cfg := benchsuite.Config{Log: os.Stderr}
	fs := flag.CommandLine
	fs.StringVar(&cfg.Agent, "agent", "bin/redis-agent", "redis-agent binary")
	fs.StringVar(&cfg.Broker, "broker", "bin/redis-broker", "redis-broker binary; empty to leave out the broker figures")
	fs.IntVar(&cfg.PortMin, "port-min", 30000, "first port of the agent's range")
	fs.IntVar(&cfg.Samples, "samples", 200, "provisions and deletes measured")
	fs.IntVar(&cfg.Concurrency, "concurrency", 16, "callers of the concurrent provision scenario")
	fs.IntVar(&cfg.Kills, "kills", 100, "crash recoveries measured")
	fs.IntVar(&cfg.Density, "density", 1000, "instances of the density scenario")
	fs.DurationVar(&cfg.Idle, "idle", 30*time.Second, "idle measurement at density")
	fs.DurationVar(&cfg.APIDuration, "api-duration", 5*time.Second, "GET throughput measurement")
	fs.IntVar(&cfg.APIClients, "api-clients", 32, "concurrent GET clients")
	fs.IntVar(&cfg.SnapshotMB, "snapshot-mb", 100, "dataset of the snapshot and restore scenario, MiB")
	fs.IntVar(&cfg.RolloutInstances, "rollout", 10, "small instances of the rolling upgrade scenario")
	fs.IntVar(&cfg.IOMB, "io-mb", 64, "data set of the IO scenario's noisy tenant, MiB")
	fs.IntVar(&cfg.IOLimitMBs, "io-limit-mbs", 20, "the IO scenario's write limit of the noisy tenant, MiB/s")
	fs.DurationVar(&cfg.IODuration, "io-duration", 5*time.Second, "the IO scenario's quiet neighbour measured this long on each side of each round; 0 leaves it out")
	fs.IntVar(&cfg.BrokerSamples, "broker-samples", 50, "provisions and deletes through the broker, and as many directly")
	fs.IntVar(&cfg.DrainInstances, "drain", 20, "AOF instances on the agent the broker drains")
	fs.IntVar(&cfg.DrainMB, "drain-mb", 10, "data in each drained instance, MiB")
	fs.IntVar(&cfg.BenchRequests, "bench-requests", 200000, "redis-benchmark requests of each TLS figure")
	fs.StringVar(&cfg.VersityGW, "versitygw", versityGW(), "the Versity S3 gateway the backup figures run against; empty to leave them out ("+`go install github.com/versity/versitygw/cmd/versitygw@v1.8.0`+")")

	out := fs.String("out", "docs/benchmarks.md", "Markdown page to write; empty for none (with -only, none but another file than docs/benchmarks.md)")
	quick := fs.Bool("quick", false, "a smoke run of a few seconds (overrides the sizes)")
	only := fs.String("only", "", "comma-separated scenarios to run (the bare start references always run): "+strings.Join(benchsuite.Scenarios, ","))
	agentArgs := fs.String("agent-args", "", "flags added to the agent's, space-separated (say, --pprof-listen 127.0.0.1:6060)")
	agentLog := fs.String("agent-log", "", "file to append the agent's log to, at level info")
	flag.Parse()
	cfg.AgentArgs = strings.Fields(*agentArgs)
	if *agentLog != "" {
		f, err := os.OpenFile(*agentLog, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
		if err != nil {
			return err
		}
		defer f.Close()
		cfg.AgentLog = f
	}
	if *only != "" {
		for _, o := range strings.Split(*only, ",") {
			if !slices.Contains(benchsuite.Scenarios, o) {
				return fmt.Errorf("-only: no scenario %q: want some of %s", o, strings.Join(benchsuite.Scenarios, ","))
			}
			cfg.Only = append(cfg.Only, o)
		}
	}
	if *quick {
		cfg.Samples, cfg.Kills, cfg.Density, cfg.Concurrency = 5, 5, 10, 4
		cfg.Idle, cfg.APIDuration, cfg.APIClients = time.Second, time.Second, 4
		cfg.SnapshotMB, cfg.RolloutInstances = 4, 3
		cfg.IOMB, cfg.IODuration = 4, time.Second
		cfg.BrokerSamples, cfg.DrainInstances, cfg.DrainMB = 5, 2, 2
		cfg.BenchRequests = 20000
	}
	var err error
	if cfg.RedisServer, err = exec.LookPath("redis-server"); err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "redis-agent-bench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfg.Dir = dir
	res, err := benchsuite.Run(context.Background(), cfg)
	if err != nil {
		return err
	}
	fmt.Print(res.Table())
	outSet := false
	fs.Visit(func(f *flag.Flag) { outSet = outSet || f.Name == "out" })
	if len(cfg.Only) > 0 && (!outSet || *out == "docs/benchmarks.md") {
		*out = "" // a part of the table does not replace the whole page
	}
	if *out != "" {
		command := "make bench"
		if *quick {
			command = "go run ./test/bench -quick"
		}
		if err := os.WriteFile(*out, []byte(res.Markdown(command)), 0o644); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "wrote", *out)
	}
	return nil
}

// versityGW is versitygw from PATH, else from go install's directory.
func versityGW() string {
	if p, err := exec.LookPath("versitygw"); err == nil {
		return p
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		p := filepath.Join(strings.TrimSpace(string(out)), "bin", "versitygw")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	return ""
}
