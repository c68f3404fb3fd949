package benchsuite

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/confine"
	"github.com/redis-agent/redis-agent/redis"
)

// confineRounds is how many times the launcher scenario switches between
// a confined and an unconfined agent, so that neither side gets the
// machine's quieter minutes.
const confineRounds = 5

// launcherCost measures what the confinement costs: provisions and crash
// recoveries on the agent as it runs by default (every redis-server
// through redis-agent-launch, as its own uid) next to the same agent with
// --confine off (no launcher; the uid per instance stays), in alternating
// rounds; and the memory of an idle instance of each. The agent runs
// confined again afterwards.
func (s *suite) launcherCost(samples, kills int) error {
	var on, off struct {
		prov, rec []time.Duration
		pss, rss  float64
	}
	for r := range confineRounds {
		for _, confined := range []bool{true, false} {
			side, extra := &on, []string(nil)
			if !confined {
				side, extra = &off, []string{"--confine", "off"}
			}
			s.logf("launcher cost, round %d of %d, confined=%v", r+1, confineRounds, confined)
			if err := s.restartAgentWith(extra); err != nil {
				return err
			}
			prov, _, err := s.provisionDelete(max(samples/confineRounds, 1))
			if err != nil {
				return err
			}
			rec, err := s.crashRecovery(max(kills/confineRounds, 1))
			if err != nil {
				return err
			}
			side.prov, side.rec = append(side.prov, prov...), append(side.rec, rec...)
			if r == 0 {
				if side.pss, side.rss, err = s.idleMemory("mem"); err != nil {
					return err
				}
			}
		}
	}
	if err := s.restartAgentWith(nil); err != nil {
		return err
	}
	for _, f := range []struct {
		name    string
		on, off []time.Duration
	}{{"provision, sequential", on.prov, off.prov}, {"crash recovery", on.rec, off.rec}} {
		p, q := pct(f.on, 50), pct(f.off, 50)
		s.add(Row{Figure: f.name + ", p50, confined (launcher + own uid; the default)", Value: ms(p), Unit: "ms", Reference: ms(q), Aim: "ref: --confine off, same rounds"})
		s.add(Row{Figure: "  launcher's cost: confined - unconfined, p50", Value: ms(p - q), Unit: "ms", Aim: "<= 1 ms"})
	}
	if err := s.launcherAlone(20 * samples); err != nil {
		return err
	}
	s.add(Row{Figure: "idle instance's own memory (PSS), confined", Value: on.pss / (1 << 20), Unit: "MiB", Reference: off.pss / (1 << 20), Aim: "ref: --confine off"})
	s.add(Row{Figure: "idle instance's RSS, confined", Value: on.rss / (1 << 20), Unit: "MiB", Reference: off.rss / (1 << 20), Aim: "ref: --confine off"})
	return nil
}

// restartAgentWith stops the agent (its instances keep running) and starts
// it again with extra flags.
func (s *suite) restartAgentWith(extra []string) error {
	s.stopAgent(syscall.SIGTERM)
	s.extra = extra
	return s.startAgent()
}

// idleMemory provisions id, lets it settle for a second, reads its
// process's PSS and RSS (smaps_rollup) and deletes it.
func (s *suite) idleMemory(id string) (pss, rss float64, err error) {
	if _, err := s.provision(id); err != nil {
		return 0, 0, err
	}
	time.Sleep(time.Second)
	in, err := s.get(id)
	if err != nil {
		return 0, 0, err
	}
	if pss, rss, err = smapsRollup(in.PID); err != nil {
		return 0, 0, err
	}
	_, err = s.remove(id)
	return pss, rss, err
}

// smapsRollup reads a process's PSS and RSS, in bytes, from
// /proc/<pid>/smaps_rollup. PSS counts each page shared by n processes
// (the binary, the libraries) as 1/n of a page: summed over processes it
// is what they take together, where RSS counts a shared page in full in
// every process.
func smapsRollup(pid int) (pss, rss float64, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, 0, err
	}
	kb := kbFields(b)
	pss, rss = kb["Pss:"], kb["Rss:"]
	if pss == 0 {
		return 0, 0, fmt.Errorf("no Pss in /proc/%d/smaps_rollup", pid)
	}
	return pss, rss, nil
}

// launcher is the redis-agent-launch beside the agent under test, the
// one it runs its redis-servers through.
func (s *suite) launcher() string {
	return filepath.Join(filepath.Dir(s.cfg.Agent), "redis-agent-launch")
}

// launcherAlone times the launcher by itself: an exec of true through it,
// bare (no layer) and with the layers an instance gets, against an exec of
// true directly, interleaved, n of each.
func (s *suite) launcherAlone(n int) error {
	launcher := s.launcher()
	tru, err := exec.LookPath("true")
	if err != nil {
		return err
	}
	dir := s.cfg.Dir
	// As the agent runs them: confine.Command, and redis.Env.
	variants := []func() *exec.Cmd{
		func() *exec.Cmd { return exec.Command(tru) },
		func() *exec.Cmd {
			return confine.Command(context.Background(), launcher, confine.Policy{Exec: []string{tru}, NoLandlock: true, NoSeccomp: true}, tru)
		},
		func() *exec.Cmd {
			return confine.Command(context.Background(), launcher, confine.Policy{Exec: []string{tru}, ReadOnly: []string{s.bin()}, ReadWrite: []string{dir}}, tru)
		},
	}
	times := make([][]time.Duration, len(variants))
	for range n {
		for i, v := range variants {
			cmd := v()
			cmd.Env = append(cmd.Env, redis.Env...)
			t0 := time.Now()
			if out, err := cmd.CombinedOutput(); err != nil {
				return fmt.Errorf("%q: %v: %s", cmd.Args, err, out)
			}
			times[i] = append(times[i], time.Since(t0))
		}
	}
	direct, bare, full := pct(times[0], 50), pct(times[1], 50), pct(times[2], 50)
	s.add(Row{Figure: "  the launcher alone: exec of true through it - true directly, p50", Value: ms(full - direct), Unit: "ms", Aim: fmt.Sprintf("%d of each, interleaved", n)})
	s.add(Row{Figure: "    of which a Go program's start (the launcher with no layer)", Value: ms(bare - direct), Unit: "ms"})
	s.add(Row{Figure: "    of which no_new_privs, Landlock and seccomp", Value: ms(full - bare), Unit: "ms"})
	return nil
}
