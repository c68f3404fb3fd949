package benchsuite

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/confine"
	"github.com/redis-agent/redis-agent/limits"
)

// coldBoot is a power loss of a full agent: the density instances, each
// with a binding and a key in its AOF, lose the agent and every
// redis-server at once (SIGKILL, all of them), and the agent is started
// again; timed from its exec until every binding answers PING (AUTH and
// PING on a fresh connection). Its reference is a plain start of as many
// bare redis-servers at once, each on a copy of an instance's AOF
// directory and ACL file (taken while everything was down), on that
// instance's port, timed the same way. The instances come back on a
// third start of the agent, for the scenarios after.
func (s *suite) coldBoot(ctx context.Context, n int) error {
	s.logf("cold boot of %d instances: binding each and writing a key", n)
	type target struct {
		id   string
		port int
		c    creds
	}
	ts := make([]target, n)
	err := parallel(n, 16, func(i int) error {
		id := fmt.Sprintf("dense-%04d", i)
		c, err := s.bindApp(id)
		if err != nil {
			return err
		}
		if !resp(c.addr(), c.Username, c.Password, "SET", "boot", id) {
			return fmt.Errorf("SET on %s failed", id)
		}
		ts[i] = target{id: id, port: c.Port, c: c}
		return nil
	})
	if err != nil {
		return err
	}
	time.Sleep(1100 * time.Millisecond) // appendfsync everysec: every key on disk

	s.logf("cold boot: power loss")
	if err := s.powerLoss(); err != nil {
		return err
	}
	bareDir := filepath.Join(s.cfg.Dir, "coldboot")
	confs := make([]string, n)
	for i, t := range ts {
		dir := filepath.Join(bareDir, t.id)
		inst := filepath.Join(s.data, "instances", t.id)
		if err := copyTree(filepath.Join(inst, "data", "appendonlydir"), filepath.Join(dir, "appendonlydir")); err != nil {
			return err
		}
		if err := copyFile(filepath.Join(inst, "users.acl"), filepath.Join(dir, "users.acl")); err != nil {
			return err
		}
		confs[i] = filepath.Join(dir, "redis.conf")
		conf := fmt.Sprintf("port %d\nbind 127.0.0.1\ndir %s\nappendonly yes\nappenddirname appendonlydir\nsave \"\"\naclfile %s\nlogfile %s\n",
			t.port, dir, filepath.Join(dir, "users.acl"), filepath.Join(dir, "redis.log"))
		if err := os.WriteFile(confs[i], []byte(conf), 0o644); err != nil {
			return err
		}
	}
	all, ids := make([]creds, n), make([]string, n)
	for i, t := range ts {
		all[i], ids[i] = t.c, t.id
	}

	s.logf("cold boot: agent start")
	cpu0 := machineCPU()
	t0 := time.Now()
	if err := s.launchAgent(); err != nil {
		return err
	}
	readyC := make(chan time.Duration, 1)
	go func() { d, _ := s.waitReady(); readyC <- d }()
	agentTimes, err := answering(all, t0, 2*time.Minute)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	ready := <-readyC
	agentCPU := machineCPU() - cpu0
	_, agentOwn := procUsage(s.agent.cmd.Process.Pid)
	serversCPU := 0.0
	for pid := range redisUnder(s.data) {
		_, c := procUsage(pid)
		serversCPU += c
	}

	s.logf("cold boot: power loss, then %d bare redis-servers at once", n)
	if err := s.powerLoss(); err != nil {
		return err
	}
	bare, err := s.bareBoot(ids, confs, all, nil)
	if err != nil {
		return err
	}
	// The same, each through the launcher (Landlock, seccomp) and in a
	// cgroup of its own with an instance's limits: the isolation's floor,
	// without the agent.
	var confined *bootRun
	if cg, err := limits.New("redis-agent-bench-coldboot"); err != nil {
		s.logf("cold boot: no confined reference (%v)", err)
	} else {
		s.logf("cold boot: %d confined bare redis-servers at once", n)
		run, err := s.bareBoot(ids, confs, all, cg)
		cg.RemoveRootIfEmpty()
		if err != nil {
			return fmt.Errorf("confined reference: %w", err)
		}
		confined = &run
	}
	os.RemoveAll(bareDir)

	s.add(Row{Figure: fmt.Sprintf("cold boot of %d AOF instances (power loss): agent start -> every binding answers PING", n), Value: pct(agentTimes, 100).Seconds(), Unit: "s",
		Reference: pct(bare.times, 100).Seconds(), Aim: fmt.Sprintf("<= 1.5x; ref: %d bare redis-servers started at once on copies of the AOFs", n)})
	s.add(Row{Figure: "  half of them answering (p50)", Value: pct(agentTimes, 50).Seconds(), Unit: "s", Reference: pct(bare.times, 50).Seconds()})
	s.add(Row{Figure: "  the first answering", Value: pct(agentTimes, 0).Seconds(), Unit: "s", Reference: pct(bare.times, 0).Seconds()})
	s.add(Row{Figure: "  agent start -> /readyz 200", Value: ready.Seconds(), Unit: "s"})
	s.add(Row{Figure: "  CPU the machine spent meanwhile (all processes)", Value: agentCPU, Unit: "s", Reference: bare.cpu, Aim: fmt.Sprintf("%d cores", runtime.NumCPU())})
	s.add(Row{Figure: "    of which the redis-servers' (their launcher's included)", Value: serversCPU, Unit: "s", Reference: bare.servers})
	s.add(Row{Figure: "    of which the agent's (its whole life: reconcile, starts, checks)", Value: agentOwn, Unit: "s"})
	if confined != nil {
		s.add(Row{Figure: "  against confined bare redis-servers: every binding answers PING", Value: pct(agentTimes, 100).Seconds(), Unit: "s",
			Reference: pct(confined.times, 100).Seconds(), Aim: "ref: the bare ones through redis-agent-launch, each in a cgroup with an instance's limits"})
		s.add(Row{Figure: "    the confined bare ones against the bare ones", Value: pct(confined.times, 100).Seconds(), Unit: "s", Reference: pct(bare.times, 100).Seconds(), Aim: "the isolation's own cost"})
		s.add(Row{Figure: "    CPU the machine spent (confined bare, all processes)", Value: confined.cpu, Unit: "s", Reference: bare.cpu})
		s.add(Row{Figure: "      of which the redis-servers' (confined bare, their launcher's included)", Value: confined.servers, Unit: "s", Reference: bare.servers})
	}

	s.logf("cold boot: the agent again, for what follows")
	return s.startAgent()
}

// bootRun is a start of bare redis-servers at once: when each answered,
// the CPU the machine spent meanwhile and the servers' own.
type bootRun struct {
	times        []time.Duration
	cpu, servers float64
}

// bareBoot starts a redis-server on each of confs at once, times until
// every binding of all answers, and kills them. With cg, each runs
// through the launcher, confined to its directory as an instance is, and
// is put in a cgroup of its own with the limits of an instance of 16 MiB
// (the density's); the cgroups are removed after.
func (s *suite) bareBoot(ids, confs []string, all []creds, cg *limits.Manager) (bootRun, error) {
	var run bootRun
	n := len(confs)
	cmds := make([]*exec.Cmd, n)
	exited := make([]chan struct{}, n)
	defer func() {
		for i, c := range cmds {
			if c != nil {
				c.Process.Kill()
				<-exited[i]
			}
		}
		if cg != nil {
			for _, id := range ids {
				cg.Remove(id)
			}
		}
	}()
	// A bare redis-server that exits (its port taken by something else on
	// the machine, say) ends the figure with its log, not with a wait.
	gone := make(chan int, n)
	lim := limits.Limits{MemoryBytes: limits.MemoryFor(16), CPUShares: 1024, Pids: 128}
	cpu0 := machineCPU()
	t0 := time.Now()
	for i := range cmds {
		c := exec.Command(s.cfg.RedisServer, confs[i])
		if cg != nil {
			dir := filepath.Dir(confs[i])
			c = confine.Command(context.Background(), s.launcher(), confine.Policy{Exec: []string{s.cfg.RedisServer}, ReadWrite: []string{dir}}, s.cfg.RedisServer, confs[i])
		}
		if err := c.Start(); err != nil {
			return run, err
		}
		cmds[i], exited[i] = c, make(chan struct{})
		go func() { c.Wait(); close(exited[i]); gone <- i }()
		if cg != nil {
			// As the agent does: once started, into its cgroup.
			if err := cg.Apply(ids[i], c.Process.Pid, lim); err != nil {
				return run, fmt.Errorf("cgroup of %s: %w", ids[i], err)
			}
		}
	}
	polled := make(chan error, 1)
	go func() {
		var err error
		run.times, err = answering(all, t0, 2*time.Minute)
		polled <- err
	}()
	select {
	case err := <-polled:
		if err != nil {
			return run, fmt.Errorf("bare: %w", err)
		}
	case i := <-gone:
		tail, _ := os.ReadFile(filepath.Join(filepath.Dir(confs[i]), "redis.log"))
		<-polled
		return run, fmt.Errorf("bare redis-server of %s exited: %s", ids[i], tail[max(0, len(tail)-600):])
	}
	run.cpu = machineCPU() - cpu0
	for _, c := range cmds {
		_, u := procUsage(c.Process.Pid)
		run.servers += u
	}
	for i, c := range cmds {
		c.Process.Kill()
		<-exited[i]
		cmds[i] = nil
	}
	return run, nil
}

// machineCPU is the CPU time the machine has spent, all cores and modes
// but idle and iowait, in seconds (/proc/stat).
func machineCPU() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var busy float64
	for i, v := range f[1:] {
		n, _ := strconv.ParseFloat(v, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy / 100
}

// powerLoss SIGKILLs the agent and every redis-server under its data
// directory (and the cold boot's bare ones), and waits until they are
// gone. The agent dies first, so it restarts nothing; a process it was
// starting at that moment (forked, not yet exec'd, its command line still
// the agent's) shows up only once it has exec'd, so the kill goes round
// until no process has been seen for 300 ms.
func (s *suite) powerLoss() error {
	if s.agent != nil {
		s.agent.cmd.Process.Signal(syscall.SIGKILL)
		<-s.agent.exited
		s.agent = nil
	}
	deadline := time.Now().Add(30 * time.Second)
	quiet := time.Now()
	for time.Since(quiet) < 300*time.Millisecond {
		alive := redisUnder(s.data)
		for pid := range redisUnder(filepath.Join(s.cfg.Dir, "coldboot")) {
			alive[pid] = true
		}
		if len(alive) > 0 {
			if time.Now().After(deadline) {
				return fmt.Errorf("%d redis-servers still there 30 s after SIGKILL", len(alive))
			}
			for pid := range alive {
				syscall.Kill(pid, syscall.SIGKILL)
			}
			quiet = time.Now()
		}
		time.Sleep(10 * time.Millisecond)
	}
	return nil
}

// answering polls every binding in cs (AUTH and PING on a fresh
// connection; 16 pollers, each going round its share) until each has
// answered once, and returns how long after t0 each first did. Between
// two rounds a poller waits a twentieth of the time since t0, at least
// 10 ms and at most 100 ms, so an answer is seen within 5 % of its time:
// at a fixed 10 ms the polls of a start that takes long took the CPU the
// starts need (16 % of the machine's CPU in a 12 s cold boot, against 7 %
// in a 5 s one), the slower side paying the more.
func answering(cs []creds, t0 time.Time, timeout time.Duration) ([]time.Duration, error) {
	const pollers = 16
	out := make([]time.Duration, len(cs))
	var wg sync.WaitGroup
	errs := make(chan error, pollers)
	for w := range pollers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var pending []int
			for i := w; i < len(cs); i += pollers {
				pending = append(pending, i)
			}
			for len(pending) > 0 {
				left := pending[:0]
				for _, i := range pending {
					if resp(cs[i].addr(), cs[i].Username, cs[i].Password, "PING") {
						out[i] = time.Since(t0)
					} else {
						left = append(left, i)
					}
				}
				pending = left
				if time.Since(t0) > timeout {
					errs <- fmt.Errorf("%d bindings not answering after %v, %s among them", len(pending), timeout, cs[pending[0]].addr())
					return
				}
				time.Sleep(min(max(time.Since(t0)/20, 10*time.Millisecond), 100*time.Millisecond))
			}
		}()
	}
	wg.Wait()
	close(errs)
	return out, <-errs
}

// copyTree copies the regular files of directory from into a new
// directory to.
func copyTree(from, to string) error {
	if err := os.MkdirAll(to, 0o755); err != nil {
		return err
	}
	entries, err := os.ReadDir(from)
	if err != nil {
		return err
	}
	for _, e := range entries {
		if e.Type().IsRegular() {
			if err := copyFile(filepath.Join(from, e.Name()), filepath.Join(to, e.Name())); err != nil {
				return err
			}
		}
	}
	return nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
