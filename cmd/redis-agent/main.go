// Command redis-agent is the node agent that runs one dedicated
// redis-server per tenant on this machine and serves the REST API a broker
// calls. main only turns flags and environment into a server.Config and
// calls server.Run.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis-agent/redis-agent/agent"
	"github.com/redis-agent/redis-agent/backup"
	"github.com/redis-agent/redis-agent/server"
)

func main() {
	run := run
	if len(os.Args) > 1 && os.Args[1] == "status" {
		run = status
		os.Args = append(os.Args[:1], os.Args[2:]...)
	}
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "redis-agent:", err)
		os.Exit(1)
	}
}

// envs reads REDIS_AGENT_* variables as flag defaults and remembers the
// ones that do not parse, so a typo in the environment is an error rather
// than a silent default.
type envs struct{ errs []error }

func (e *envs) str(name, def string) string {
	if v, ok := os.LookupEnv("REDIS_AGENT_" + name); ok {
		return v
	}
	return def
}

func (e *envs) int(name string, def int) int {
	v, ok := os.LookupEnv("REDIS_AGENT_" + name)
	if !ok {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		e.errs = append(e.errs, fmt.Errorf("REDIS_AGENT_%s=%q: want an integer", name, v))
		return def
	}
	return n
}

func (e *envs) float(name string, def float64) float64 {
	v, ok := os.LookupEnv("REDIS_AGENT_" + name)
	if !ok {
		return def
	}
	f, err := strconv.ParseFloat(v, 64)
	if err != nil {
		e.errs = append(e.errs, fmt.Errorf("REDIS_AGENT_%s=%q: want a number", name, v))
		return def
	}
	return f
}

func (e *envs) duration(name string, def time.Duration) time.Duration {
	v, ok := os.LookupEnv("REDIS_AGENT_" + name)
	if !ok {
		return def
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		e.errs = append(e.errs, fmt.Errorf("REDIS_AGENT_%s=%q: want a duration like 10s", name, v))
		return def
	}
	return d
}

func (e *envs) size(name string, def int64) int64 {
	v, ok := os.LookupEnv("REDIS_AGENT_" + name)
	if !ok {
		return def
	}
	n, err := parseSize(v)
	if err != nil {
		e.errs = append(e.errs, fmt.Errorf("REDIS_AGENT_%s=%q: %v", name, v, err))
		return def
	}
	return n
}

// parseSize reads a number of bytes: digits, optionally followed by K, M,
// G or T (powers of 1024; "Ki", "KiB" and "KB" mean the same).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	num := strings.TrimRight(t, "KMGTiBkmgtb")
	unit := strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(t[len(num):], "B"), "b"))
	unit = strings.TrimSuffix(unit, "I")
	shift := map[string]uint{"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
	sh, ok := shift[unit]
	n, err := strconv.ParseInt(strings.TrimSpace(num), 10, 64)
	if !ok || err != nil || n < 0 || n > (1<<62)>>sh {
		return 0, fmt.Errorf("want a size in bytes like 1048576, 64M or 1G")
	}
	return n << sh, nil
}

// sizeValue is a flag of a size (parseSize).
type sizeValue struct{ p *int64 }

func (v sizeValue) String() string {
	if v.p == nil {
		return "0"
	}
	return strconv.FormatInt(*v.p, 10)
}

func (v sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if err == nil {
		*v.p = n
	}
	return err
}

// settings is what the command line and the environment ask for.
type settings struct {
	cfg                              server.Config
	pprofListen, logLevel, logFormat string
}

// parse turns args and the REDIS_AGENT_* environment into settings; a
// usage message (and -help) goes to out.
func parse(args []string, out io.Writer) (settings, error) {
	cfg := server.DefaultConfig()
	var ev envs
	env, envInt, envDuration := ev.str, ev.int, ev.duration
	fs := flag.NewFlagSet("redis-agent", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.Listen, "listen", env("LISTEN", cfg.Listen), "API listen address (env REDIS_AGENT_LISTEN)")
	fs.StringVar(&cfg.Agent.DataDir, "data-dir", env("DATA_DIR", cfg.Agent.DataDir), "state and instance directories (env REDIS_AGENT_DATA_DIR)")
	fs.StringVar(&cfg.Agent.LogDir, "log-dir", env("LOG_DIR", cfg.Agent.LogDir), "redis-server logs; default <data-dir>/logs (env REDIS_AGENT_LOG_DIR)")
	fs.IntVar(&cfg.Agent.PortMin, "port-min", envInt("PORT_MIN", cfg.Agent.PortMin), "lowest port for instances (env REDIS_AGENT_PORT_MIN)")
	fs.IntVar(&cfg.Agent.PortMax, "port-max", envInt("PORT_MAX", cfg.Agent.PortMax), "highest port for instances (env REDIS_AGENT_PORT_MAX)")
	fs.StringVar(&cfg.Agent.RedisServer, "redis-server", env("REDIS_SERVER", cfg.Agent.RedisServer), "redis-server executable; default from PATH (env REDIS_AGENT_REDIS_SERVER)")
	fs.StringVar(&cfg.Agent.RedisCheckRDB, "redis-check-rdb", env("REDIS_CHECK_RDB", cfg.Agent.RedisCheckRDB), "not used any more: a restore's candidate checks the file as it loads it; accepted so existing configurations start (env REDIS_AGENT_REDIS_CHECK_RDB)")
	fs.StringVar(&cfg.Agent.BindHost, "bind", env("BIND", cfg.Agent.BindHost), "address every redis-server listens on (env REDIS_AGENT_BIND)")
	fs.StringVar(&cfg.Agent.AdvertiseHost, "advertise-host", env("ADVERTISE_HOST", cfg.Agent.AdvertiseHost), "host given in credentials; default the bind address (env REDIS_AGENT_ADVERTISE_HOST)")
	fs.IntVar(&cfg.Agent.DefaultMemoryMB, "default-memory-mb", envInt("DEFAULT_MEMORY_MB", cfg.Agent.DefaultMemoryMB), "maxmemory of an instance provisioned without one (env REDIS_AGENT_DEFAULT_MEMORY_MB)")
	fs.IntVar(&cfg.Agent.MemoryBudgetMB, "memory-budget-mb", envInt("MEMORY_BUDGET_MB", cfg.Agent.MemoryBudgetMB), "total maxmemory handed out; default 75% of RAM (env REDIS_AGENT_MEMORY_BUDGET_MB)")
	fs.StringVar(&cfg.Agent.RedisUser, "redis-user", env("REDIS_USER", cfg.Agent.RedisUser), "user every redis-server runs as when the agent is root and --instance-uids is off, and that older agents' instances run as until their next start (env REDIS_AGENT_REDIS_USER)")
	fs.StringVar(&cfg.Agent.InstanceUIDs, "instance-uids", env("INSTANCE_UIDS", cfg.Agent.InstanceUIDs), "as root, a uid and gid per instance: auto (a block of 65536 from 1879048192, by the data dir), MIN-MAX, or off (env REDIS_AGENT_INSTANCE_UIDS)")
	fs.StringVar(&cfg.Agent.Confine, "confine", env("CONFINE", cfg.Agent.Confine), "on: start every redis-server through redis-agent-launch (no_new_privs, Landlock, seccomp); off: unconfined (env REDIS_AGENT_CONFINE)")
	fs.StringVar(&cfg.Agent.Launcher, "launcher", env("LAUNCHER", cfg.Agent.Launcher), "the redis-agent-launch executable; default beside redis-agent, else from PATH (env REDIS_AGENT_LAUNCHER)")
	fs.DurationVar(&cfg.Agent.ReadyTimeout, "ready-timeout", envDuration("READY_TIMEOUT", cfg.Agent.ReadyTimeout), "wait for a new redis-server to answer PING (env REDIS_AGENT_READY_TIMEOUT)")
	fs.DurationVar(&cfg.Agent.StopTimeout, "stop-timeout", envDuration("STOP_TIMEOUT", cfg.Agent.StopTimeout), "graceful stop before SIGKILL (env REDIS_AGENT_STOP_TIMEOUT)")
	fs.DurationVar(&cfg.Agent.Health.Interval, "health-interval", envDuration("HEALTH_INTERVAL", cfg.Agent.Health.Interval), "check (INFO) every running redis-server this often (env REDIS_AGENT_HEALTH_INTERVAL)")
	fs.DurationVar(&cfg.Agent.Health.Timeout, "health-timeout", envDuration("HEALTH_TIMEOUT", cfg.Agent.Health.Timeout), "a check (INFO) unanswered after this fails (env REDIS_AGENT_HEALTH_TIMEOUT)")
	fs.IntVar(&cfg.Agent.Health.Failures, "health-failures", envInt("HEALTH_FAILURES", cfg.Agent.Health.Failures), "failed checks in a row before a hung redis-server is killed and restarted (env REDIS_AGENT_HEALTH_FAILURES)")
	fs.DurationVar(&cfg.Agent.Restart.Base, "restart-base", envDuration("RESTART_BASE", cfg.Agent.Restart.Base), "delay after the second fast crash in a row, doubling after (env REDIS_AGENT_RESTART_BASE)")
	fs.DurationVar(&cfg.Agent.Restart.Max, "restart-max", envDuration("RESTART_MAX", cfg.Agent.Restart.Max), "longest restart delay (env REDIS_AGENT_RESTART_MAX)")
	fs.DurationVar(&cfg.Agent.Restart.StableAfter, "restart-stable-after", envDuration("RESTART_STABLE_AFTER", cfg.Agent.Restart.StableAfter), "a run this long resets the crash count (env REDIS_AGENT_RESTART_STABLE_AFTER)")
	tokenFile := fs.String("token-file", env("TOKEN_FILE", ""), "file holding the API bearer token (env REDIS_AGENT_TOKEN_FILE, or the token itself in REDIS_AGENT_TOKEN)")
	fs.StringVar(&cfg.Agent.Cgroups, "cgroups", env("CGROUPS", cfg.Agent.Cgroups), "auto: a cgroup per instance (memory = 2 x maxmemory + 64 MiB, CPU, pids) where the host allows; off (env REDIS_AGENT_CGROUPS)")
	fs.IntVar(&cfg.Agent.MaxClients, "max-clients", envInt("MAX_CLIENTS", 0), "maxclients of every redis-server; 0 = Redis's default, 10000 (env REDIS_AGENT_MAX_CLIENTS)")
	fs.StringVar(&cfg.Agent.CgroupRoot, "cgroup-root", env("CGROUP_ROOT", ""), "parent cgroup of this agent's instances; default redis-agent for the default data dir, else redis-agent-<hash of the data dir> (env REDIS_AGENT_CGROUP_ROOT)")
	fs.Uint64Var(&cfg.Agent.CPUShares, "cpu-shares", uint64(envInt("CPU_SHARES", int(cfg.Agent.CPUShares))), "relative CPU weight of each instance (env REDIS_AGENT_CPU_SHARES)")
	fs.Float64Var(&cfg.Agent.CPUQuota, "cpu-quota", ev.float("CPU_QUOTA", cfg.Agent.CPUQuota), "hard CPU cap per instance in cores, 0 for none (env REDIS_AGENT_CPU_QUOTA)")
	fs.Int64Var(&cfg.Agent.Pids, "pids-limit", int64(envInt("PIDS_LIMIT", int(cfg.Agent.Pids))), "most processes and threads per instance (env REDIS_AGENT_PIDS_LIMIT)")
	ioSize := func(p *int64, name, env, what string) {
		*p = ev.size(env, *p)
		fs.Var(sizeValue{p}, name, what+" (env REDIS_AGENT_"+env+")")
	}
	ioSize(&cfg.Agent.IOReadBPS, "io-read-bps", "IO_READ_BPS", "default read limit of each instance on the data directory's disk, bytes a second (64M, 1G); 0 for none")
	ioSize(&cfg.Agent.IOWriteBPS, "io-write-bps", "IO_WRITE_BPS", "default write limit of each instance on the data directory's disk, bytes a second; 0 for none")
	fs.Int64Var(&cfg.Agent.IOReadIOPS, "io-read-iops", int64(envInt("IO_READ_IOPS", int(cfg.Agent.IOReadIOPS))), "default read operations a second of each instance on the data directory's disk; 0 for none (env REDIS_AGENT_IO_READ_IOPS)")
	fs.Int64Var(&cfg.Agent.IOWriteIOPS, "io-write-iops", int64(envInt("IO_WRITE_IOPS", int(cfg.Agent.IOWriteIOPS))), "default write operations a second of each instance on the data directory's disk; 0 for none (env REDIS_AGENT_IO_WRITE_IOPS)")
	fs.Int64Var(&cfg.Agent.IOWeight, "io-weight", int64(envInt("IO_WEIGHT", int(cfg.Agent.IOWeight))), "default share of the data directory's disk under contention, 1-1000 (100 for all is even); only the BFQ scheduler uses it; 0 for the kernel's (env REDIS_AGENT_IO_WEIGHT)")
	fs.DurationVar(&cfg.Agent.DiskInterval, "disk-interval", envDuration("DISK_INTERVAL", cfg.Agent.DiskInterval), "measure every instance's files (and rotate its log) this often (env REDIS_AGENT_DISK_INTERVAL)")
	fs.StringVar(&cfg.Agent.DiskBudget, "disk-budget", env("DISK_BUDGET", cfg.Agent.DiskBudget), "on: refuse (507) a provision or resize whose disk reservation does not fit the data file system; off: overcommit the disk, only report it (env REDIS_AGENT_DISK_BUDGET)")
	fs.Int64Var(&cfg.Agent.DiskHeadroomMB, "disk-headroom-mb", int64(envInt("DISK_HEADROOM_MB", int(cfg.Agent.DiskHeadroomMB))), "disk of the data file system the budget keeps free of reservations, MiB (env REDIS_AGENT_DISK_HEADROOM_MB)")
	ioSize(&cfg.Agent.LogMaxBytes, "log-max-size", "LOG_MAX_SIZE", "rotate an instance's redis-server log past this size (2M, 16M); 0 never")
	fs.IntVar(&cfg.Agent.LogKeep, "log-keep", envInt("LOG_KEEP", cfg.Agent.LogKeep), "rotated logs kept per instance (env REDIS_AGENT_LOG_KEEP)")
	fs.StringVar(&cfg.TLSCert, "tls-cert", env("TLS_CERT", ""), "PEM certificate: serve the API over HTTPS (env REDIS_AGENT_TLS_CERT)")
	fs.StringVar(&cfg.TLSKey, "tls-key", env("TLS_KEY", ""), "PEM key of --tls-cert (env REDIS_AGENT_TLS_KEY)")
	fs.StringVar(&cfg.TLSClientCA, "tls-client-ca", env("TLS_CLIENT_CA", ""), "PEM CA: client certificates it signed authenticate /v1 (mTLS) (env REDIS_AGENT_TLS_CLIENT_CA)")
	fs.StringVar(&cfg.Agent.InstanceCACert, "instance-ca-cert", env("INSTANCE_CA_CERT", ""), "PEM certificate of the CA that signs the instances' TLS certificates; default the agent's own, made in <data-dir>/tls at its first start (env REDIS_AGENT_INSTANCE_CA_CERT)")
	fs.StringVar(&cfg.Agent.InstanceCAKey, "instance-ca-key", env("INSTANCE_CA_KEY", ""), "PEM key of --instance-ca-cert (env REDIS_AGENT_INSTANCE_CA_KEY)")
	fs.DurationVar(&cfg.Agent.CertValidity, "instance-cert-validity", envDuration("INSTANCE_CERT_VALIDITY", 0), "validity of an instance's TLS certificate, renewed live once a third is left; default 2160h (90 days) (env REDIS_AGENT_INSTANCE_CERT_VALIDITY)")
	fs.BoolVar(&cfg.MetricsAuth, "metrics-auth", env("METRICS_AUTH", "") == "true", "put /metrics behind the API's authentication (env REDIS_AGENT_METRICS_AUTH=true)")
	fs.IntVar(&cfg.MaxUploads, "max-uploads", envInt("MAX_UPLOADS", cfg.MaxUploads), "most restores (snapshot uploads) in progress at once; one more is answered 503 with Retry-After (env REDIS_AGENT_MAX_UPLOADS)")
	b := &cfg.Agent.Backup
	fs.StringVar(&b.Target.Endpoint, "backup-endpoint", env("BACKUP_ENDPOINT", ""), "S3-compatible endpoint of the backup bucket: host[:port] (HTTPS) or an http(s):// URL; with --backup-bucket, turns scheduled backups on (env REDIS_AGENT_BACKUP_ENDPOINT)")
	fs.StringVar(&b.Target.Bucket, "backup-bucket", env("BACKUP_BUCKET", ""), "the backup bucket, which must exist (env REDIS_AGENT_BACKUP_BUCKET)")
	fs.StringVar(&b.Target.Region, "backup-region", env("BACKUP_REGION", ""), "the bucket's region; default: ask the server (env REDIS_AGENT_BACKUP_REGION)")
	fs.StringVar(&b.Target.Prefix, "backup-prefix", env("BACKUP_PREFIX", "redis-agent"), "key prefix of every backup: <prefix>/<instance id>/<time>.rdb; agents that are to restore each other's instances share it (env REDIS_AGENT_BACKUP_PREFIX)")
	fs.BoolVar(&b.Target.PathStyle, "backup-path-style", env("BACKUP_PATH_STYLE", "") == "true", "address the bucket as endpoint/bucket (MinIO, Ceph, most gateways) rather than bucket.endpoint (env REDIS_AGENT_BACKUP_PATH_STYLE=true)")
	fs.StringVar(&b.Target.CAFile, "backup-ca", env("BACKUP_CA", ""), "PEM CA bundle that verifies the endpoint's certificate instead of the system's (env REDIS_AGENT_BACKUP_CA)")
	credsFile := fs.String("backup-credentials-file", env("BACKUP_CREDENTIALS_FILE", ""), "file of AWS_ACCESS_KEY_ID=... and AWS_SECRET_ACCESS_KEY=... lines; default those variables from the environment (env REDIS_AGENT_BACKUP_CREDENTIALS_FILE)")
	fs.StringVar(&b.AgentName, "backup-agent-name", env("BACKUP_AGENT_NAME", ""), "this agent's name in its backups' metadata, by which a broker finds a lost agent's instances; default the host name (env REDIS_AGENT_BACKUP_AGENT_NAME)")
	fs.StringVar(&b.Schedule, "backup-schedule", env("BACKUP_SCHEDULE", agent.DefaultBackupSchedule), "default schedule of instances' backups: off, an interval (6h), or a daily window in UTC (\"daily 02:00-04:00\"); instances are spread over it (env REDIS_AGENT_BACKUP_SCHEDULE)")
	fs.IntVar(&b.Keep, "backup-keep", envInt("BACKUP_KEEP", 7), "default number of backups kept per instance; 0 for no limit by count (env REDIS_AGENT_BACKUP_KEEP)")
	fs.IntVar(&b.KeepDays, "backup-keep-days", envInt("BACKUP_KEEP_DAYS", 0), "default days backups are kept; 0 for no limit by age (env REDIS_AGENT_BACKUP_KEEP_DAYS)")
	fs.IntVar(&b.Parallel, "backup-parallel", envInt("BACKUP_PARALLEL", 2), "most backups (BGSAVE forks and uploads) in progress at once (env REDIS_AGENT_BACKUP_PARALLEL)")
	fs.DurationVar(&b.Timeout, "backup-timeout", envDuration("BACKUP_TIMEOUT", time.Hour), "bound of one backup, BGSAVE and upload (env REDIS_AGENT_BACKUP_TIMEOUT)")
	pprofListen := fs.String("pprof-listen", env("PPROF_LISTEN", ""), "serve net/http/pprof on this loopback address, for profiling (env REDIS_AGENT_PPROF_LISTEN)")
	logLevel := fs.String("log-level", env("LOG_LEVEL", "info"), "debug, info, warn or error (env REDIS_AGENT_LOG_LEVEL)")
	logFormat := fs.String("log-format", env("LOG_FORMAT", "auto"), "text, json, or auto: text on a terminal, else json (env REDIS_AGENT_LOG_FORMAT)")
	if err := fs.Parse(args); err != nil {
		return settings{}, err
	}
	if fs.NArg() > 0 {
		return settings{}, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := errors.Join(ev.errs...); err != nil {
		return settings{}, err
	}
	if cfg.MaxUploads < 1 {
		return settings{}, fmt.Errorf("--max-uploads %d: want at least 1", cfg.MaxUploads)
	}
	var err error
	if cfg.Token, err = token(*tokenFile); err != nil {
		return settings{}, err
	}
	if b.Target.Enabled() {
		if *credsFile != "" {
			if b.Target.AccessKey, b.Target.SecretKey, err = backup.ReadCredentials(*credsFile); err != nil {
				return settings{}, err
			}
		} else {
			b.Target.AccessKey, b.Target.SecretKey = os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY")
		}
		if b.Parallel < 1 {
			return settings{}, fmt.Errorf("--backup-parallel %d: want at least 1", b.Parallel)
		}
	}
	return settings{cfg: cfg, pprofListen: *pprofListen, logLevel: *logLevel, logFormat: *logFormat}, nil
}

// token reads the API token from file, else from REDIS_AGENT_TOKEN. White
// space around it is no part of it (a header value cannot carry it), and
// a blank one is none.
func token(file string) (string, error) {
	if file == "" {
		return strings.TrimSpace(os.Getenv("REDIS_AGENT_TOKEN")), nil
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("token file: %w", err)
	}
	// Anyone on the host could read it, a tenant's process among them
	// where confinement is off.
	if st, err := os.Stat(file); err == nil && st.Mode().Perm()&0o004 != 0 {
		return "", fmt.Errorf("token file %s is readable by every user (mode %04o): chmod o-r it (0600 is usual)", file, st.Mode().Perm())
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("token file %s is empty", file)
	}
	return t, nil
}

func run(args []string) error {
	st, err := parse(args, os.Stderr)
	if err != nil {
		return err
	}
	cfg := st.cfg
	var level slog.Level
	if err := level.UnmarshalText([]byte(st.logLevel)); err != nil {
		return fmt.Errorf("log level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch st.logFormat {
	case "text":
		h = slog.NewTextHandler(os.Stderr, opts)
	case "json":
		h = slog.NewJSONHandler(os.Stderr, opts)
	case "auto":
		if st, err := os.Stderr.Stat(); err == nil && st.Mode()&os.ModeCharDevice != 0 {
			h = slog.NewTextHandler(os.Stderr, opts)
		} else {
			h = slog.NewJSONHandler(os.Stderr, opts)
		}
	default:
		return fmt.Errorf("log format %q: want text, json or auto", st.logFormat)
	}
	cfg.Agent.Logger = slog.New(h)

	if st.pprofListen != "" {
		if err := servePprof(st.pprofListen); err != nil {
			return err
		}
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return server.Run(ctx, cfg)
}
