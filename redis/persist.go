package redis

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Env is the whole environment of the redis-server processes the agent
// runs, and of the tools it runs on their files: nothing of the agent's
// own (its API token included) reaches them.
var Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}

// Fields returns the fields of one INFO section.
func (a *Admin) Fields(ctx context.Context, section string) (map[string]string, error) {
	r, err := a.Do(ctx, "INFO", section)
	if err != nil {
		return nil, fmt.Errorf("INFO %s: %w", section, err)
	}
	out := map[string]string{}
	eachField(r.Str, func(k, v string) { out[k] = v })
	return out, nil
}

// forkJob describes a background job of redis-server (BGSAVE,
// BGREWRITEAOF) by its INFO persistence fields.
type forkJob struct {
	name       string
	count      string // counter of jobs started since the server started
	inProgress []string
	status     string // "ok" after the last job succeeded
}

var (
	bgsave = forkJob{name: "BGSAVE", count: "rdb_saves",
		inProgress: []string{"rdb_bgsave_in_progress"}, status: "rdb_last_bgsave_status"}
	bgrewrite = forkJob{name: "BGREWRITEAOF", count: "aof_rewrites",
		inProgress: []string{"aof_rewrite_in_progress", "aof_rewrite_scheduled"}, status: "aof_last_bgrewrite_status"}
)

// pollEvery is how often a wait for a background job looks at INFO.
const pollEvery = 10 * time.Millisecond

// run starts the job with start (after any job of its kind already running,
// which began before the caller asked and so would not be fresh) and waits
// until a job started after the call has finished. It fails when that job
// failed.
func (j forkJob) run(ctx context.Context, a *Admin, start func() error) error {
	busy := func(f map[string]string) bool {
		for _, k := range j.inProgress {
			if f[k] == "1" {
				return true
			}
		}
		return false
	}
	var before int
	for {
		f, err := a.Fields(ctx, "persistence")
		if err != nil {
			return err
		}
		if busy(f) {
			if err := sleep(ctx, pollEvery); err != nil {
				return fmt.Errorf("%s: waiting for the running one: %w", j.name, err)
			}
			continue
		}
		if before, err = strconv.Atoi(f[j.count]); err != nil {
			return fmt.Errorf("%s: INFO has no %s (Redis older than 7.0?)", j.name, j.count)
		}
		err = start()
		if err != nil && strings.Contains(err.Error(), "in progress") {
			continue // one started between INFO and our command
		}
		if err != nil {
			return fmt.Errorf("%s: %w", j.name, err)
		}
		break
	}
	for {
		f, err := a.Fields(ctx, "persistence")
		if err != nil {
			return err
		}
		n, _ := strconv.Atoi(f[j.count])
		if n > before && !busy(f) {
			if f[j.status] != "ok" {
				return fmt.Errorf("%s failed (%s: %s); the redis-server log says why", j.name, j.status, f[j.status])
			}
			return nil
		}
		if err := sleep(ctx, pollEvery); err != nil {
			return fmt.Errorf("%s: waiting for it to finish: %w", j.name, err)
		}
	}
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Save makes the server write a fresh RDB of its data set to its dir and
// dbfilename, in the background (BGSAVE SCHEDULE: after an AOF rewrite in
// progress, if any), and returns once that RDB is complete. Whatever the
// persistence mode, the RDB is a consistent point-in-time copy taken after
// the call began.
func (a *Admin) Save(ctx context.Context) error {
	return bgsave.run(ctx, a, func() error { _, err := a.Do(ctx, "BGSAVE", "SCHEDULE"); return err })
}

// RewriteAOF compacts the server's AOF from its data set (BGREWRITEAOF) and
// returns once the rewrite is complete.
func (a *Admin) RewriteAOF(ctx context.Context) error {
	return bgrewrite.run(ctx, a, func() error { _, err := a.Do(ctx, "BGREWRITEAOF"); return err })
}

// EnableAOF switches on appendonly on a server running without it: Redis
// writes a new AOF from the data set in memory. It returns once that AOF is
// complete, so the data set survives a restart with appendonly yes.
func (a *Admin) EnableAOF(ctx context.Context) error {
	return bgrewrite.run(ctx, a, func() error { _, err := a.Do(ctx, "CONFIG", "SET", "appendonly", "yes"); return err })
}

// SetMaxmemory changes the server's maxmemory, live.
func (a *Admin) SetMaxmemory(ctx context.Context, mb int) error {
	if _, err := a.Do(ctx, "CONFIG", "SET", "maxmemory", strconv.Itoa(mb)+"mb"); err != nil {
		return fmt.Errorf("CONFIG SET maxmemory: %w", err)
	}
	return nil
}

// Version is what `redis-server --version` says about a binary.
type Version struct {
	// Version is the release, "7.0.15".
	Version string
	// Build is the build id, different for every build of a release.
	Build string
}

func (v Version) String() string {
	if v.Build == "" {
		return v.Version
	}
	return v.Version + " (build " + v.Build + ")"
}

// BinaryVersion runs binary --version and reads its
// "Redis server v=7.0.15 sha=... build=..." line.
func BinaryVersion(ctx context.Context, binary string) (Version, error) {
	cmd := exec.CommandContext(ctx, binary, "--version")
	cmd.Env = Env
	out, err := cmd.Output()
	if err != nil {
		return Version{}, fmt.Errorf("%s --version: %w", binary, err)
	}
	return ParseVersion(string(out))
}

// ParseVersion reads the output of redis-server --version.
func ParseVersion(out string) (Version, error) {
	var v Version
	for _, f := range strings.Fields(out) {
		if s, ok := strings.CutPrefix(f, "v="); ok {
			v.Version = s
		} else if s, ok := strings.CutPrefix(f, "build="); ok {
			v.Build = s
		}
	}
	if v.Version == "" {
		return v, errors.New("redis-server --version: no v= in " + strconv.Quote(strings.TrimSpace(out)))
	}
	return v, nil
}
