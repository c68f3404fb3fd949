package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/confine"
	"github.com/redis-agent/redis-agent/internal/procfs"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/state"
)

// A restore's candidate is the redis-server that becomes the instance: the
// instance's own binary on the instance's own config, as its user, in its
// cgroup and confined like it, but on the staged data directory and a
// unix socket only (redis.RenderCandidate). It loads the staged data at
// its start, which is the restore's one check of the file (the RDB's
// structure and checksum, as any start of the instance would make them)
// and its one load: once it has, the supervisor stops the old process,
// the data directories are exchanged, and the candidate is moved onto the
// instance's ports (Supervisor.Handover). The old process serves until
// then, and a file that does not load never stops it.

const (
	// candidateConf is the candidate's config, in the staging directory
	// (beside the staged data directory, not in it).
	candidateConf = "candidate.conf"
	// candidateSocket is its unix socket, relative to its data directory.
	candidateSocket = "restore.sock"
)

// candidateTimeout bounds a candidate's load of its data set.
const candidateTimeout = 30 * time.Minute

// candidateStartTimeout bounds a candidate's start until it answers on its
// socket (LOADING counts as an answer).
const candidateStartTimeout = 30 * time.Second

// candidate is one restore candidate at work.
type candidate struct {
	s  *Service
	id string
	// memoryMB is the instance's, for what an error says.
	memoryMB int
	cmd      *exec.Cmd
	dirf     *os.File // its data directory, which the socket is dialled through
	admin    *redis.Admin
	// logPath is the instance's log, which the candidate writes to from
	// logFrom on; ooms the cgroup's OOM kills before its start.
	logPath string
	logFrom int64
	ooms    uint64
	// taken is set once the supervisor has it (Handover).
	taken bool
}

// startCandidate starts rec's candidate on the staged data, in the
// instance's cgroup with room for it beside the running process.
func (s *Service) startCandidate(rec state.Instance, in *instance) (c *candidate, err error) {
	id := rec.ID
	c = &candidate{s: s, id: id, memoryMB: rec.MemoryMB, logPath: s.layout.LogPath(id)}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	dir := s.layout.StagedDataDir(id)
	conf := filepath.Join(s.layout.StagingDir(id), candidateConf)
	if err := s.layout.WriteConfig(conf, redis.RenderCandidate(s.layout.ConfPath(id), dir, candidateSocket), s.ownerOf(rec)); err != nil {
		return nil, err
	}
	if c.dirf, err = os.Open(dir); err != nil {
		return nil, err
	}
	binary := in.sup.Binary()
	if err := syscall.Access(binary, 1 /* X_OK */); err != nil {
		return nil, fmt.Errorf("redis-server %s: %w", binary, err)
	}
	logf, err := os.OpenFile(c.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log: %w", err)
	}
	defer logf.Close()
	if fi, err := logf.Stat(); err == nil {
		c.logFrom = fi.Size()
	}
	c.ooms, _ = s.cg.OOMKills(id)
	cmd := confine.Command(context.Background(), s.launcher, s.serverPolicy(id, binary, dir, conf), binary, conf)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(cmd.Env, redis.Env...) // after the launcher's own (confine.Command)
	// As the instance's own processes: its own session, and no Pdeathsig,
	// since it outlives the agent once it is the instance. An agent that
	// dies before that leaves it running; the next one kills it
	// (killCandidates).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: s.credOf(rec)}
	// Room for it in the cgroup it shares with the running process from
	// before its start: the memory and pids of a second instance.
	in.side.Store(true)
	if err := cmd.Start(); err != nil {
		in.side.Store(false)
		return nil, fmt.Errorf("start the restore's redis-server: %w", err)
	}
	c.cmd = cmd
	pid := cmd.Process.Pid
	if err := os.WriteFile("/proc/"+strconv.Itoa(pid)+"/oom_score_adj", []byte(strconv.Itoa(instanceOOMScoreAdj)), 0); err != nil {
		s.log.Debug("set oom_score_adj", "pid", pid, "err", err)
	}
	if err := s.cg.Apply(id, pid, s.liveLimits(id, rec.MemoryMB, rec.Persistence, rec.IO)); err != nil {
		s.log.Warn("restore's redis-server runs without limits", "instance", id, "err", err)
	}
	c.admin = redis.NewSocketAdmin(fmt.Sprintf("/proc/self/fd/%d/%s", c.dirf.Fd(), candidateSocket), rec.AdminPassword)
	return c, nil
}

// serverPolicy is the confinement of id's redis-server running binary on
// conf with the data directory dir: the instance's own, or a restore's
// candidate's (which reads the instance's config too).
func (s *Service) serverPolicy(id, binary, dir, conf string) confine.Policy {
	ro := []string{conf, s.layout.ACLPath(id), s.layout.TLSDir(id)}
	if main := s.layout.ConfPath(id); conf != main {
		ro = append(ro, main)
	}
	return s.policy(confine.Policy{
		Exec: []string{binary},
		// The tls directory, not its files: a renewal adds new ones,
		// which the running server reads on CONFIG SET.
		ReadOnly:  ro,
		ReadWrite: []string{dir, s.layout.LogPath(id)},
	})
}

// exited reports whether the candidate has exited (it is a zombie until
// reaped).
func (c *candidate) exited() bool {
	st, err := procfs.ReadStat(c.cmd.Process.Pid)
	return err != nil || st.Gone()
}

// waitLoaded waits until the candidate has loaded its data set and
// returns its used_memory; ErrInvalid when the data does not load (or
// does not fit the instance's cgroup).
func (c *candidate) waitLoaded(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, candidateTimeout)
	defer cancel()
	startBy := time.Now().Add(candidateStartTimeout)
	answered := false
	tick := time.NewTicker(time.Millisecond)
	defer tick.Stop()
	for {
		err := c.admin.Ping(ctx)
		if err == nil {
			break
		}
		if c.exited() {
			return 0, c.refused()
		}
		var se redis.ServerError
		switch {
		case errors.As(err, &se) && se.Loading():
			answered = true
		case errors.As(err, &se):
			// It runs, and refuses the agent (its admin user not in its
			// ACL file, say): no wait makes that pass.
			return 0, fmt.Errorf("the restore's redis-server refuses the agent: %w", err)
		}
		if !answered && time.Now().After(startBy) {
			return 0, fmt.Errorf("the restore's redis-server did not answer on its socket within %s: %w", candidateStartTimeout, err)
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return 0, fmt.Errorf("the restore's redis-server did not load the snapshot: %w", ctx.Err())
		}
	}
	mem, err := c.admin.Fields(ctx, "memory")
	if err != nil {
		return 0, fmt.Errorf("restore's redis-server: %w", err)
	}
	used, err := strconv.ParseInt(mem["used_memory"], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("restore's redis-server: used_memory %q: %w", mem["used_memory"], err)
	}
	return used, nil
}

// refused says why the candidate exited: its cgroup killed it for memory,
// or it found the data corrupt (its log says how); one that exited before
// it made its socket failed at its start, not on the file.
func (c *candidate) refused() error {
	pid := c.cmd.Process.Pid
	lines := c.logLines(pid, 3)
	if n, _ := c.s.cg.OOMKills(c.id); n > c.ooms {
		if in := c.s.runtime(c.id); in != nil {
			in.oomKills.Store(n) // not the instance's own
		}
		return fmt.Errorf("the snapshot's data set needs more than the %d MiB memory limit of the instance: %w",
			limits.MemoryFor(c.memoryMB)>>20, ErrInvalid)
	}
	if _, err := os.Lstat(filepath.Join(c.s.layout.StagedDataDir(c.id), candidateSocket)); err != nil {
		return fmt.Errorf("the restore's redis-server exited at its start: %s", lines)
	}
	return fmt.Errorf("redis-server cannot load the snapshot: %s: %w", lines, ErrInvalid)
}

// logLines returns the last n lines pid wrote to the instance's log since
// the candidate started, joined ("pid:role time level message", Redis's
// own format; lines before it had read its config carry no pid).
func (c *candidate) logLines(pid, n int) string {
	f, err := os.Open(c.logPath)
	if err != nil {
		return "(no log)"
	}
	defer f.Close()
	if _, err := f.Seek(c.logFrom, io.SeekStart); err != nil {
		return "(no log)"
	}
	own := strconv.Itoa(pid)
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		// Not another pid's: the old process writes here too.
		head, _, ok := strings.Cut(line, ":")
		if _, err := strconv.Atoi(head); line != "" && (!ok || err != nil || head == own) {
			out = append(out, line)
		}
		if len(out) > n {
			out = out[1:]
		}
	}
	if len(out) == 0 {
		return "(nothing in its log)"
	}
	return strings.Join(out, "; ")
}

// becomeInstance moves the candidate, now in the live data directory, onto
// the instance's ports, and gives it the instance's title, by which a
// later agent adopts it.
func (c *candidate) becomeInstance(ctx context.Context, rec state.Instance) error {
	port := rec.Port
	if tlsOf(rec) == apitype.TLSRequired {
		port = 0
	}
	pairs := []string{"port", strconv.Itoa(port)}
	if t := c.s.tlsConf(rec); t != nil {
		pairs = append(pairs, "tls-port", strconv.Itoa(t.Port))
	}
	// One at a time: the title shows the listening address of when it is
	// set, so it comes after the ports.
	for i := 0; i < len(pairs); i += 2 {
		if err := c.admin.SetConfig(ctx, pairs[i], pairs[i+1]); err != nil {
			return err
		}
	}
	return c.admin.SetConfig(ctx, "proc-title-template", redis.InstanceTitle(c.s.layout.ConfPath(rec.ID)))
}

// stop kills the candidate (its process group: a fork it made too)
// unless the supervisor has it, and waits until it is gone.
func (c *candidate) stop() {
	if c.admin != nil {
		c.admin.Close()
	}
	if c.cmd != nil && !c.taken {
		syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
		c.cmd.Wait()
		c.cmd = nil
	}
	if c.dirf != nil {
		c.dirf.Close()
		c.dirf = nil
	}
	if in := c.s.runtime(c.id); in != nil && in.side.Swap(false) {
		// Back to one process's room, for the one that runs.
		if pid := in.sup.Status().Process.PID; pid != 0 {
			c.s.confine(c.id, pid)
		}
	}
}
