package agent

import (
	"context"
	"fmt"
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

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/redis"
	"github.com/redis-agent/redis-agent/volumes"
)

// snapshotLoader proves a staged snapshot before a restore swaps it in:
// Load returns nil once the staged data directory of job.ID holds data the
// instance will start on (for the aof modes, the AOF written from it), an
// error wrapping ErrInvalid when the file does not load or does not fit,
// and any other error when the loader itself failed.
type snapshotLoader interface {
	Load(ctx context.Context, job loadJob) error
}

// loadJob is one staged snapshot to load.
type loadJob struct {
	// ID is the instance: its staging directory holds the snapshot.
	ID string
	// Binary is the instance's own redis-server.
	Binary string
	// MemoryMB is the instance's maxmemory, which the data set must fit.
	MemoryMB int
	// Persistence is the instance's mode: the aof modes get the AOF.
	Persistence string
	// Limits are the loader's cgroup's, the instance's own.
	Limits limits.Limits
	// Owner is the instance's Redis user, Cred the same as a credential
	// (nil: the agent's own user).
	Owner volumes.Owner
	Cred  *syscall.Credential
}

// loaderTimeout bounds a loader's whole run (load, AOF, shutdown), and a
// wait for an instance to load its data set.
const loaderTimeout = 30 * time.Minute

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
// instance, confined to the staging directory like the instance to its
// own, and killed if the agent dies.
type redisLoader struct {
	layout volumes.Layout
	// launcher and policy confine it as the instance's processes are.
	launcher string
	policy   func(confine.Policy) confine.Policy
	cg       loaderCgroups
	log      *slog.Logger
}

var _ snapshotLoader = (*redisLoader)(nil)

// Load runs a loader on the staged data directory of job.ID: it must load
// the staged RDB (proving the instance will), the data set must fit in the
// instance's maxmemory, and for the aof modes it writes the AOF from what
// it loaded, because Redis 7 with appendonly yes ignores an RDB when it
// finds no AOF. It then shuts down without saving.
func (l *redisLoader) Load(ctx context.Context, job loadJob) (err error) {
	ctx, cancel := context.WithTimeout(ctx, loaderTimeout)
	defer cancel()
	// Pdeathsig fires when the thread that forked the child exits: keep
	// this goroutine on its thread until the loader is gone.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	p, err := l.start(job)
	if err != nil {
		return err
	}
	group := loaderGroup(job.ID)
	if err := l.cg.Apply(group, p.cmd.Process.Pid, job.Limits); err != nil {
		l.log.Warn("restore loader runs without limits", "instance", job.ID, "err", err)
	}
	defer func() {
		p.close() // the process first: a cgroup with one in it stays
		if err != nil {
			if n, _ := l.cg.OOMKills(group); n > 0 {
				err = fmt.Errorf("the snapshot's data set needs more than the %d MiB memory limit of the instance: %w",
					limits.MemoryFor(job.MemoryMB)>>20, ErrInvalid)
			}
		}
		if rerr := l.cg.Remove(group); rerr != nil {
			l.log.Warn("restore cgroup left behind", "instance", job.ID, "err", rerr)
		}
	}()

	if err := p.waitLoaded(ctx); err != nil {
		return err
	}
	mem, err := p.admin.Fields(ctx, "memory")
	if err != nil {
		return fmt.Errorf("loader: %w", err)
	}
	if used, _ := strconv.ParseInt(mem["used_memory"], 10, 64); used > int64(job.MemoryMB)<<20 {
		return fmt.Errorf("the snapshot's data set uses %.1f MiB, more than the instance's memory_mb %d (resize it first): %w",
			float64(used)/(1<<20), job.MemoryMB, ErrInvalid)
	}
	aof := apitype.IsAOF(job.Persistence)
	if aof {
		if err := p.admin.EnableAOF(ctx); err != nil {
			return fmt.Errorf("loader: write the AOF: %w", err)
		}
	}
	if err := p.admin.Shutdown(ctx, true); err != nil {
		return fmt.Errorf("loader: %w", err)
	}
	if err := p.waitExit(ctx); err != nil {
		return err
	}
	if aof {
		// The AOF holds the data now; an RDB beside it would only be
		// ignored.
		os.Remove(filepath.Join(l.layout.StagedDataDir(job.ID), rdbName))
	}
	return nil
}

// loaderProcess is one running loader and the connection to it.
type loaderProcess struct {
	cmd     *exec.Cmd
	exited  chan error
	reaped  bool
	admin   *redis.Admin
	dir     *os.File // the staging directory, which the socket is dialled through
	logPath string
}

// start writes the loader's config into the staging directory of job.ID
// and starts it there.
func (l *redisLoader) start(job loadJob) (*loaderProcess, error) {
	dir := l.layout.StagingDir(job.ID)
	data := l.layout.StagedDataDir(job.ID)
	conf := filepath.Join(dir, "loader.conf")
	// The socket is dir/loader.sock, bound by a path relative to data and
	// dialled through this process's descriptor of dir: a socket address
	// holds 107 bytes, and dir's path alone can be longer.
	if err := l.layout.WriteConfig(conf, redis.RenderLoader(data, "../loader.sock"), job.Owner); err != nil {
		return nil, err
	}
	p := &loaderProcess{logPath: filepath.Join(dir, "loader.log"), exited: make(chan error, 1)}
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_EXCL|os.O_WRONLY|syscall.O_NOFOLLOW, 0o640)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the loader has its own
	if p.dir, err = os.Open(dir); err != nil {
		return nil, err
	}
	pol := l.policy(confine.Policy{Exec: []string{job.Binary}, ReadOnly: []string{conf}, ReadWrite: []string{dir}})
	p.cmd = confine.Command(context.Background(), l.launcher, pol, job.Binary, conf)
	p.cmd.Dir = data
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.Env = redis.Env
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Credential: job.Cred, Pdeathsig: syscall.SIGKILL}
	if err := p.cmd.Start(); err != nil {
		p.dir.Close()
		return nil, fmt.Errorf("start loader: %w", err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	p.admin = redis.NewSocketAdmin(fmt.Sprintf("/proc/self/fd/%d/loader.sock", p.dir.Fd()))
	return p, nil
}

// waitLoaded waits until the loader has loaded the file, and says why it
// could not when it exits first.
func (p *loaderProcess) waitLoaded(ctx context.Context) error {
	for {
		f, err := p.admin.Fields(ctx, "persistence")
		if err == nil && f["loading"] == "0" {
			return nil
		}
		select {
		case werr := <-p.exited:
			p.reaped = true
			tail, _ := volumes.Tail(p.logPath, 3)
			return fmt.Errorf("loader exited (%v): redis-server cannot load the snapshot: %s: %w", werr, strings.Join(tail, "; "), ErrInvalid)
		case <-ctx.Done():
			return fmt.Errorf("loader: %w", ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// waitExit waits for the loader to exit after its SHUTDOWN.
func (p *loaderProcess) waitExit(ctx context.Context) error {
	select {
	case <-p.exited:
		p.reaped = true
		return nil
	case <-ctx.Done():
		return fmt.Errorf("loader did not exit: %w", ctx.Err())
	}
}

// close ends the connection and, unless the loader has exited, kills it
// and waits until it is gone.
func (p *loaderProcess) close() {
	p.admin.Close()
	if !p.reaped {
		// The whole group: an AOF rewrite the loader forked too.
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
	p.dir.Close()
}
