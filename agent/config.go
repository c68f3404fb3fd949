package agent

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/redis-agent/redis-agent/supervisor"
)

// Config is everything the Service can be told; how the API is served
// (address, authentication, TLS) is the server package's. DefaultConfig
// gives values that work as root and as an ordinary user; Validate checks
// a Config.
type Config struct {
	// DataDir holds the state file (state/) and the instance directories
	// (instances/<id>/).
	DataDir string
	// LogDir holds one redis-server log per instance; "" means DataDir/logs.
	LogDir string
	// PortMin and PortMax bound the ports handed to instances (inclusive).
	PortMin, PortMax int
	// RedisServer is the redis-server executable.
	RedisServer string
	// RedisCheckRDB is not used any more (a restore's candidate checks
	// the file as it loads it); the flag is accepted so existing configurations
	// start.
	RedisCheckRDB string
	// BindHost is the address every redis-server listens on.
	BindHost string
	// AdvertiseHost is the host put in binding credentials; "" means BindHost.
	AdvertiseHost string
	// DefaultMemoryMB is the maxmemory of an instance provisioned without one.
	DefaultMemoryMB int
	// MemoryBudgetMB is the total maxmemory the agent hands out.
	MemoryBudgetMB int
	// RedisUser is the unprivileged user every redis-server runs as when
	// the agent runs as root without instance users (InstanceUIDs "off"),
	// and the one instances an older agent started still run as until
	// their next start. Ignored when the agent is not root.
	RedisUser string
	// InstanceUIDs is "auto" (as root, a uid and gid per instance from a
	// block of UIDRangeFor(DataDir)), "MIN-MAX" (from that range) or "off".
	InstanceUIDs string
	// Confine is "on" (every redis-server, restores' candidates included,
	// is started through Launcher, which confines it: package confine) or
	// "off".
	Confine string
	// Launcher is the redis-agent-launch executable.
	Launcher string
	// ReadyTimeout bounds the wait for a new redis-server to answer PING.
	ReadyTimeout time.Duration
	// StopTimeout bounds a graceful stop before SIGKILL.
	StopTimeout time.Duration
	// Restart is the restart policy of crashed instances.
	Restart supervisor.Policy
	// Health is the hang detection of running instances.
	Health supervisor.Health
	// bootTurns is how many starts run at once at boot; 0 is
	// bootStartsPerCPU per core (a test sets it).
	bootTurns int
	// Cgroups is "auto" (a cgroup per instance where the host allows it,
	// with a log line when it does not) or "off".
	Cgroups string
	// MaxClients is each redis-server's maxclients; 0 is Redis's default
	// (10000, fewer under a low open-files limit).
	MaxClients int
	// CgroupRoot is the parent cgroup of this agent's instances. Empty
	// means one unique to the data directory (see CgroupParent), so two
	// agents on one host never share an instance's cgroup.
	CgroupRoot string
	// CPUShares is each instance's relative CPU weight (1024 = a fair
	// share); CPUQuota an optional hard cap in cores (0 = none); Pids the
	// most processes and threads an instance may have.
	CPUShares uint64
	CPUQuota  float64
	Pids      int64
	// InstanceCACert and InstanceCAKey are the PEM certificate and key of
	// the CA that signs the instances' TLS certificates. Empty means the
	// agent's own CA, made in the data directory at its first start and
	// kept.
	InstanceCACert, InstanceCAKey string
	// CertValidity is how long an instance's certificate is valid; it is
	// renewed once less than a third of that is left. CertCheck is how
	// often the agent looks. Zero means 90 days, and an hour (or a tenth
	// of the validity when that is shorter).
	CertValidity, CertCheck time.Duration
	// IOReadBPS, IOWriteBPS (bytes a second), IOReadIOPS and IOWriteIOPS
	// (operations a second) are every instance's default IO limits on the
	// data directory's block device, 0 none; IOWeight its default share
	// of that device under contention (1-1000, BFQ only), 0 the kernel's.
	// An instance's own setting replaces each one it sets.
	IOReadBPS, IOWriteBPS, IOReadIOPS, IOWriteIOPS int64
	IOWeight                                       int64
	// DiskInterval is how often every instance's files are measured (and
	// their logs rotated).
	DiskInterval time.Duration
	// DiskHeadroomMB is disk of the data file system that the budget
	// keeps free of reservations (for the state file, snapshots and
	// restores in flight, the system).
	DiskHeadroomMB int64
	// DiskBudget is "on" (a provision or resize whose disk reservation
	// does not fit is refused) or "off" (the disk is overcommitted: the
	// figures are reported, nothing is refused for them).
	DiskBudget string
	// LogMaxBytes is the size past which an instance's log is rotated (0:
	// never), LogKeep how many rotated logs are kept.
	LogMaxBytes int64
	LogKeep     int
	// Logger receives the agent's logs; nil means slog.Default().
	Logger *slog.Logger
	// Registerer receives the agent's metrics; nil means none.
	Registerer prometheus.Registerer
	// Backup is the backup target and the instances' default backup
	// settings; without a target, no backups.
	Backup BackupConfig
}

// DefaultConfig returns the defaults: ports 16000-16999, data under /var/lib/redis-agent as root or
// ~/.local/state/redis-agent otherwise, redis-server from PATH, a memory
// budget of 75 % of the machine's memory.
func DefaultConfig() Config {
	c := Config{
		PortMin:         16000,
		PortMax:         16999,
		BindHost:        "127.0.0.1",
		DefaultMemoryMB: 64,
		MemoryBudgetMB:  defaultBudgetMB(),
		ReadyTimeout:    10 * time.Second,
		StopTimeout:     10 * time.Second,
		Restart:         supervisor.DefaultPolicy(),
		Health:          supervisor.DefaultHealth(),
		Cgroups:         "auto",
		InstanceUIDs:    "auto",
		Confine:         "on",
		Launcher:        defaultLauncher(),
		CPUShares:       1024,
		Pids:            128,
		DiskInterval:    30 * time.Second,
		DiskHeadroomMB:  1024,
		DiskBudget:      "on",
		LogMaxBytes:     2 << 20,
		LogKeep:         3,
	}
	if os.Geteuid() == 0 {
		c.DataDir = DefaultDataDir
		if _, err := user.Lookup("redis"); err == nil {
			c.RedisUser = "redis"
		}
	} else if dir := os.Getenv("XDG_STATE_HOME"); dir != "" {
		c.DataDir = filepath.Join(dir, "redis-agent")
	} else if home, err := os.UserHomeDir(); err == nil {
		c.DataDir = filepath.Join(home, ".local", "state", "redis-agent")
	}
	if p, err := exec.LookPath("redis-server"); err == nil {
		c.RedisServer = p
	} else {
		for _, p := range []string{"/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"} {
			if _, err := os.Stat(p); err == nil {
				c.RedisServer = p
				break
			}
		}
	}
	return c
}

// defaultLauncher is redis-agent-launch beside the running executable,
// else from PATH, else "".
func defaultLauncher() string {
	if exe, err := os.Executable(); err == nil {
		beside := filepath.Join(filepath.Dir(exe), "redis-agent-launch")
		if _, err := os.Stat(beside); err == nil {
			return beside
		}
	}
	p, _ := exec.LookPath("redis-agent-launch")
	return p
}

// defaultBudgetMB is 75 % of MemTotal, or 1 GiB when it cannot be read.
func defaultBudgetMB() int {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 1024
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			kb, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			if err == nil {
				return kb / 1024 * 3 / 4
			}
		}
	}
	return 1024
}

var cgroupName = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$`)

// Validate checks c and says what to change.
func (c Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.DataDir == "" || !filepath.IsAbs(c.DataDir) {
		bad("data dir %q: want an absolute path", c.DataDir)
	}
	if c.LogDir != "" && !filepath.IsAbs(c.LogDir) {
		bad("log dir %q: want an absolute path", c.LogDir)
	}
	if !c.validPorts() {
		bad("port range %d-%d: want 1 <= min <= max <= 65535", c.PortMin, c.PortMax)
	}
	if c.RedisServer == "" {
		bad("redis-server not found in PATH: install it (apt-get install redis-server) or set --redis-server")
	} else if st, err := os.Stat(c.RedisServer); err != nil {
		bad("redis-server %q: %v", c.RedisServer, err)
	} else if st.IsDir() || st.Mode()&0o111 == 0 {
		bad("redis-server %q is not an executable file", c.RedisServer)
	}
	if net.ParseIP(c.BindHost) == nil {
		bad("bind host %q: want an IP address", c.BindHost)
	}
	if c.DefaultMemoryMB < 1 {
		bad("default memory %d MB: want >= 1", c.DefaultMemoryMB)
	}
	if c.MemoryBudgetMB < 1 {
		bad("memory budget %d MB: want >= 1", c.MemoryBudgetMB)
	} else if c.DefaultMemoryMB > c.MemoryBudgetMB {
		bad("default memory %d MB is more than the whole memory budget of %d MB: no instance provisioned without memory_mb could run", c.DefaultMemoryMB, c.MemoryBudgetMB)
	}
	if c.ReadyTimeout <= 0 || c.StopTimeout <= 0 {
		bad("ready and stop timeouts must be positive")
	}
	if r := c.Restart; r.Base <= 0 || r.Max < r.Base || r.StableAfter <= 0 {
		bad("restart policy: want 0 < base <= max and stable-after > 0")
	}
	if c.Cgroups != "auto" && c.Cgroups != "off" {
		bad("cgroups %q: want auto or off", c.Cgroups)
	}
	if c.MaxClients < 0 {
		bad("max clients %d: want a positive number, or 0 for Redis's default", c.MaxClients)
	}
	if c.CgroupRoot != "" && !cgroupName.MatchString(c.CgroupRoot) {
		bad("cgroup root %q: want one path element of letters, digits, '.', '_' and '-'", c.CgroupRoot)
	}
	if c.CPUQuota < 0 || c.Pids < 0 {
		bad("cpu quota and pids limit must not be negative")
	}
	for _, f := range []struct {
		name string
		v    int64
	}{{"read_bps", c.IOReadBPS}, {"write_bps", c.IOWriteBPS}, {"read_iops", c.IOReadIOPS}, {"write_iops", c.IOWriteIOPS}, {"weight", c.IOWeight}} {
		if err := checkIO(f.name, f.v); err != nil {
			bad("default %v", err)
		}
	}
	if c.DiskInterval <= 0 {
		bad("disk interval %v: want a positive duration", c.DiskInterval)
	}
	if c.DiskBudget != "on" && c.DiskBudget != "off" {
		bad("disk budget %q: want on or off", c.DiskBudget)
	}
	if c.DiskHeadroomMB < 0 {
		bad("disk headroom %d MB: want 0 or more", c.DiskHeadroomMB)
	}
	if c.LogMaxBytes < 0 || (c.LogMaxBytes > 0 && c.LogMaxBytes < 4<<10) {
		bad("log max size %d: want 0 (never rotate) or at least 4 KiB", c.LogMaxBytes)
	}
	if c.LogKeep < 0 || c.LogKeep > 100 {
		bad("log keep %d: want 0 to 100 rotated logs", c.LogKeep)
	}
	if c.Health.Interval <= 0 || c.Health.Timeout <= 0 || c.Health.Failures < 1 {
		bad("health check: interval and timeout must be positive and failures >= 1")
	}
	switch c.Confine {
	case "off":
	case "on":
		if c.Launcher == "" {
			bad("%v beside the agent or in PATH: install it with the agent (make build puts both in bin/), set --launcher, or --confine off to run redis-servers unconfined", errNoLauncher)
		} else if st, err := os.Stat(c.Launcher); err != nil {
			bad("launcher %q: %v", c.Launcher, err)
		} else if st.IsDir() || st.Mode()&0o111 == 0 {
			bad("launcher %q is not an executable file", c.Launcher)
		}
	default:
		bad("confine %q: want on or off", c.Confine)
	}
	if (c.InstanceCACert == "") != (c.InstanceCAKey == "") {
		bad("instance CA: give both its certificate and its key, or neither (the agent then makes its own)")
	}
	if c.CertValidity < 0 || c.CertCheck < 0 {
		bad("certificate validity and check interval must not be negative")
	}
	if c.InstanceUIDs != "auto" && c.InstanceUIDs != "off" {
		if _, _, err := ParseUIDRange(c.InstanceUIDs); err != nil {
			bad("instance uids: %v, auto or off", err)
		}
	}
	if err := c.Backup.validate(); err != nil {
		errs = append(errs, err)
	}
	if os.Geteuid() == 0 && c.InstanceUIDs == "off" {
		if c.RedisUser == "" {
			bad("running as root: set --redis-user to an unprivileged user for redis-server (no user 'redis' exists)")
		} else if u, err := user.Lookup(c.RedisUser); err != nil {
			bad("redis user %q: %v", c.RedisUser, err)
		} else if u.Uid == "0" {
			bad("redis user %q is root: want an unprivileged user", c.RedisUser)
		}
	}
	return errors.Join(errs...)
}

// checkMemory checks the memory_mb of an instance against the agent's
// whole memory budget. One larger than the whole budget could never run on
// this agent, however many instances are deleted: that is invalid input
// (ErrInvalid, 422), not a momentary lack of room (ErrCapacity, 507, which
// the budget's free part decides when the instance is recorded).
func (c Config) checkMemory(mb int) error {
	if mb < 1 {
		return fmt.Errorf("memory_mb %d: %w: want a positive number of MiB", mb, ErrInvalid)
	}
	if mb > c.MemoryBudgetMB {
		return fmt.Errorf("memory_mb %d: %w: this agent's whole memory budget is %d MiB, so no instance larger than that can run on it",
			mb, ErrInvalid, c.MemoryBudgetMB)
	}
	return nil
}

func (c Config) validPorts() bool {
	return c.PortMin >= 1 && c.PortMax <= 65535 && c.PortMin <= c.PortMax
}

// InPortRange reports whether port is one of those handed to instances,
// when the range is valid: no other listener of the agent's may use one.
func (c Config) InPortRange(port int) bool {
	return c.validPorts() && port >= c.PortMin && port <= c.PortMax
}

// DefaultDataDir is the data directory of an agent run as root.
const DefaultDataDir = "/var/lib/redis-agent"

// CgroupParent is CgroupRoot, or by default "redis-agent" for the default
// data directory and "redis-agent-<8 hex digits of its path's sha256>" for
// any other: an agent's identity on the host.
func (c Config) CgroupParent() string {
	if c.CgroupRoot != "" {
		return c.CgroupRoot
	}
	dir := filepath.Clean(c.DataDir)
	if dir == DefaultDataDir {
		return "redis-agent"
	}
	sum := sha256.Sum256([]byte(dir))
	return "redis-agent-" + hex.EncodeToString(sum[:4])
}

func (c Config) logDir() string {
	if c.LogDir != "" {
		return c.LogDir
	}
	return filepath.Join(c.DataDir, "logs")
}

func (c Config) advertiseHost() string {
	if c.AdvertiseHost != "" {
		return c.AdvertiseHost
	}
	return c.BindHost
}
