package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/confine"

	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/volumes"
)

// snapshotLoader proves a snapshot while it is received: Start runs a
// loader for job, the RDB is written to it as it arrives, and Loaded
// says, once it is all written, whether it loaded and how much memory its
// data set takes.
type snapshotLoader interface {
	Start(ctx context.Context, job loadJob) (loading, error)
}

// loading is one loader at work.
type loading interface {
	// Write feeds it the RDB, as it arrives. An error means it stopped
	// taking it: Loaded says why.
	io.Writer
	// Loaded is called once the whole RDB is written (or a Write
	// failed). It returns the used_memory of the loaded data set; an
	// error wrapping ErrInvalid when the RDB does not load (or needs more
	// than the instance's memory limit), any other error when the loader
	// itself failed.
	Loaded(ctx context.Context) (usedBytes int64, err error)
	// Close ends the loader and returns once it is gone and its files
	// and cgroup are removed.
	Close()
}

// loadJob is one snapshot to load.
type loadJob struct {
	// ID is the instance.
	ID string
	// Binary is the instance's own redis-server.
	Binary string
	// MemoryMB is the instance's maxmemory (for what an error says).
	MemoryMB int
	// Limits are the loader's cgroup's, the instance's own.
	Limits limits.Limits
	// Owner is the instance's Redis user, Cred the same as a credential
	// (nil: the agent's own user).
	Owner volumes.Owner
	Cred  *syscall.Credential
}

// loaderTimeout bounds a wait for an instance to load its data set.
const loaderTimeout = 30 * time.Minute

// loaderStartTimeout bounds a loader's start until it asks for the RDB.
const loaderStartTimeout = 30 * time.Second

// loaderGroup is the cgroup of id's restore loader ("_" starts no
// instance id: no clash).
func loaderGroup(id string) string { return "_restore-" + id }

// loaderCgroups is what a loader does with its cgroup.
type loaderCgroups interface {
	Apply(id string, pid int, l limits.Limits) error
	OOMKills(id string) (uint64, error)
	Remove(id string) error
}

// redisLoader is the snapshotLoader of the Service: a throwaway
// redis-server, the instance's own binary, on a unix socket only, run as
// the instance's Redis user in a cgroup of its own limited like the
// instance, confined to a directory of its own like the instance to its
// data, and killed if the agent dies. It is made a replica of a
// redis.Feed of the agent's on loopback and loads the RDB as the Feed
// passes it on, while the upload still arrives (repl-diskless-load), with
// redis-check-rdb's checks (sanitize-dump-payload) and the RDB's checksum.
type redisLoader struct {
	layout volumes.Layout
	// launcher and policy confine it as the instance's processes are.
	launcher string
	policy   func(confine.Policy) confine.Policy
	cg       loaderCgroups
	log      *slog.Logger
}

var _ snapshotLoader = (*redisLoader)(nil)

// loaderProcess is one running loader, its feed and its control.
type loaderProcess struct {
	l       *redisLoader
	job     loadJob
	dir     string
	dirf    *os.File // dir, which the socket is dialled through
	cmd     *exec.Cmd
	done    chan struct{} // closed once the process is reaped
	exitErr error
	admin   *redis.Admin
	feed    *redis.Feed
	conn    *redis.FeedConn
	// fed is false once a Write failed: the link is gone.
	fed bool
}

// Start writes the loader's config into a directory of its own, starts it
// and has it ask for the RDB; it returns once it has (the RDB is written
// to it next), or the error of a start that failed.
func (l *redisLoader) Start(ctx context.Context, job loadJob) (ld loading, err error) {
	p := &loaderProcess{l: l, job: job, done: make(chan struct{}), fed: true}
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if p.dir, err = l.layout.CreateLoaderDir(job.ID, job.Owner); err != nil {
		return nil, err
	}
	if p.feed, err = redis.ListenFeed("127.0.0.1"); err != nil {
		return nil, fmt.Errorf("loader: %w", err)
	}
	conf := filepath.Join(p.dir, "loader.conf")
	// The socket is bound relative to the loader's directory and dialled
	// through this process's descriptor of it: a socket address holds
	// 107 bytes, and the directory's path alone can be longer.
	if err := l.layout.WriteConfig(conf, redis.RenderLoader(p.dir, "loader.sock", p.feed.Password()), job.Owner); err != nil {
		return nil, err
	}
	logPath := filepath.Join(p.dir, "loader.log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_EXCL|os.O_WRONLY|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the loader has its own
	if p.dirf, err = os.Open(p.dir); err != nil {
		return nil, err
	}
	pol := l.policy(confine.Policy{Exec: []string{job.Binary}, ReadOnly: []string{conf}, ReadWrite: []string{p.dir}})
	cmd := confine.Command(context.Background(), l.launcher, pol, job.Binary, conf)
	cmd.Dir = p.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = redis.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: job.Cred, Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		// Pdeathsig fires when the thread that forked the child exits:
		// this goroutine keeps its thread until the child is reaped.
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		p.exitErr = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start loader: %w", err)
	}
	p.cmd = cmd
	if err := l.cg.Apply(loaderGroup(job.ID), cmd.Process.Pid, job.Limits); err != nil {
		l.log.Warn("restore loader runs without limits", "instance", job.ID, "err", err)
	}
	p.admin = redis.NewSocketAdmin(fmt.Sprintf("/proc/self/fd/%d/loader.sock", p.dirf.Fd()))

	sctx, cancel := context.WithTimeout(ctx, loaderStartTimeout)
	defer cancel()
	go func() {
		select {
		case <-p.done:
			cancel()
		case <-sctx.Done():
		}
	}()
	for p.admin.Ping(sctx) != nil {
		if err := sleepCtx(sctx, time.Millisecond); err != nil {
			return nil, p.startFailed(err)
		}
	}
	// REPLICAOF connects at once (a replicaof line in the config would
	// wait for the next replication cron, up to a second).
	if _, err := p.admin.Do(sctx, "REPLICAOF", p.feed.Host(), strconv.Itoa(p.feed.Port())); err != nil {
		return nil, p.startFailed(err)
	}
	if p.conn, err = p.feed.Accept(sctx); err != nil {
		return nil, p.startFailed(err)
	}
	return p, nil
}

// startFailed says why the loader did not come to ask for the RDB.
func (p *loaderProcess) startFailed(err error) error {
	select {
	case <-p.done:
		return fmt.Errorf("loader exited (%v): %s", p.exitErr, p.logTail())
	default:
	}
	return fmt.Errorf("loader: %w", err)
}

func (p *loaderProcess) logTail() string {
	tail, _ := volumes.Tail(filepath.Join(p.dir, "loader.log"), 3)
	return strings.Join(tail, "; ")
}

func (p *loaderProcess) Write(b []byte) (int, error) {
	n, err := p.conn.Write(b)
	if err != nil {
		p.fed = false
	}
	return n, err
}

// ReadFrom feeds it r (a file: by sendfile).
func (p *loaderProcess) ReadFrom(r io.Reader) (int64, error) {
	n, err := p.conn.ReadFrom(r)
	if err != nil {
		p.fed = false
	}
	return n, err
}

// Loaded waits for the loader to acknowledge the RDB, then reads its
// used_memory.
func (p *loaderProcess) Loaded(ctx context.Context) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, loaderTimeout)
	defer cancel()
	err := errors.New("the link to the loader broke")
	if p.fed {
		err = p.conn.End(ctx)
	}
	if err != nil {
		if ctx.Err() != nil {
			return 0, fmt.Errorf("loader: %w", ctx.Err())
		}
		return 0, p.refused()
	}
	mem, err := p.admin.Fields(ctx, "memory")
	if err != nil {
		return 0, fmt.Errorf("loader: %w", err)
	}
	used, err := strconv.ParseInt(mem["used_memory"], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("loader: used_memory %q: %w", mem["used_memory"], err)
	}
	return used, nil
}

// refused says why the loader gave up the RDB: it found it corrupt (and
// exited, or dropped the link), or its cgroup killed it for memory.
func (p *loaderProcess) refused() error {
	// An exit, when it comes, comes with the dropped link.
	select {
	case <-p.done:
	case <-time.After(200 * time.Millisecond):
	}
	if n, _ := p.l.cg.OOMKills(loaderGroup(p.job.ID)); n > 0 {
		return fmt.Errorf("the snapshot's data set needs more than the %d MiB memory limit of the instance: %w",
			limits.MemoryFor(p.job.MemoryMB)>>20, ErrInvalid)
	}
	return fmt.Errorf("redis-server cannot load the snapshot: %s: %w", p.logTail(), ErrInvalid)
}

// Close kills the loader (its process group: a fork it made too), waits
// until it is gone, and removes its directory and cgroup.
func (p *loaderProcess) Close() {
	if p.admin != nil {
		p.admin.Close()
	}
	if p.conn != nil {
		p.conn.Close()
	}
	if p.feed != nil {
		p.feed.Close()
	}
	if p.cmd != nil {
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	if p.dirf != nil {
		p.dirf.Close()
	}
	// The process first: a cgroup with one in it stays.
	if err := p.l.cg.Remove(loaderGroup(p.job.ID)); err != nil {
		p.l.log.Warn("restore cgroup left behind", "instance", p.job.ID, "err", err)
	}
	if p.dir != "" {
		if err := os.RemoveAll(p.dir); err != nil {
			p.l.log.Warn("restore loader directory left behind; the next start removes it", "instance", p.job.ID, "err", err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
