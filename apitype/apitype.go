// Package apitype holds every type and constant that crosses the agent's
// REST API: request and response bodies, the error body and its codes,
// persistence modes, rollout states and header names. It imports only the
// standard library, so a consumer of the API (the client, a broker) does
// not pull in the agent's store, cgroups or Redis client. The agent, the
// API handlers and the client all use these, and nothing declares them
// again.
package apitype

import (
	"encoding/json"
	"time"
)

// Persistence modes of an instance.
const (
	PersistenceAOF       = "aof"        // appendonly, appendfsync everysec (default)
	PersistenceAOFAlways = "aof-always" // appendonly, appendfsync always
	PersistenceRDB       = "rdb"        // RDB snapshots on the usual save points
	PersistenceNone      = "none"       // nothing is written to disk
)

// Persistences lists the persistence modes, the default first.
var Persistences = []string{PersistenceAOF, PersistenceAOFAlways, PersistenceRDB, PersistenceNone}

// IsAOF reports whether mode keeps an append-only file.
func IsAOF(mode string) bool { return mode == PersistenceAOF || mode == PersistenceAOFAlways }

// MaxmemoryPolicies are the eviction policies (Redis's maxmemory-policy)
// an instance may have, the default first: every one Redis 7 knows.
var MaxmemoryPolicies = []string{
	"noeviction", "allkeys-lru", "allkeys-lfu", "allkeys-random",
	"volatile-lru", "volatile-lfu", "volatile-random", "volatile-ttl",
}

// DefaultMaxmemoryPolicy is the eviction policy of an instance
// provisioned without one: writes are refused once maxmemory is reached.
const DefaultMaxmemoryPolicy = "noeviction"

// DefaultMaxmemoryClients is the maxmemory_clients of an instance
// provisioned without one: client buffers are not limited apart.
const DefaultMaxmemoryClients = "0"

// MaxmemoryClientsPattern is what a maxmemory_clients may be, in lower
// case: 0, a percentage of maxmemory (at most 100%), or a size in bytes
// with an optional unit (k, kb, m, mb, g, gb; b).
const MaxmemoryClientsPattern = `^(0|[1-9][0-9]{0,2}%|[1-9][0-9]{0,14}(b|k|kb|m|mb|g|gb)?)$`

// TLS modes of an instance.
const (
	TLSOff      = "off"      // plain TCP only (default)
	TLSOptional = "optional" // plain port and TLS port
	TLSRequired = "required" // TLS port only; the plain one is closed
)

// TLSModes lists the TLS modes, the default first.
var TLSModes = []string{TLSOff, TLSOptional, TLSRequired}

// Spec is what the broker asks for when it provisions an instance
// (PUT /v1/instances/{id}).
type Spec struct {
	// MemoryMB is the instance's maxmemory in MiB; 0 means the agent's default.
	MemoryMB int `json:"memory_mb"`
	// Persistence is one of aof, aof-always, rdb, none; "" means aof.
	Persistence string `json:"persistence"`
	// Metadata is an opaque JSON object the caller stores with the
	// instance and gets back with it (a broker keeps its plan, service and
	// context there, so it needs no database of its own); at most
	// MaxMetadataBytes. Part of what makes two provisions identical.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// ReplicaOf makes the new instance a replica of that primary: the
	// target of a move, until POST .../promote.
	ReplicaOf *Primary `json:"replica_of,omitempty"`
	// MaxmemoryPolicy is the eviction policy, one of MaxmemoryPolicies;
	// "" means DefaultMaxmemoryPolicy.
	MaxmemoryPolicy string `json:"maxmemory_policy,omitempty"`
	// MaxmemoryClients bounds the memory of all client connections
	// together (Redis's maxmemory-clients): "0" (none, the default), a
	// percentage of maxmemory ("10%") or a size ("8mb"); beyond it the
	// clients using the most are disconnected.
	MaxmemoryClients string `json:"maxmemory_clients,omitempty"`
	// TLS is one of TLSModes; "" means off.
	TLS string `json:"tls,omitempty"`
	// IO is the instance's own IO limits, over the agent's defaults. Part
	// of what makes two provisions identical.
	IO *IOSetting `json:"io,omitempty"`
}

// Settings are what a PATCH may change besides memory_mb and metadata,
// each only when set.
type Settings struct {
	MaxmemoryPolicy  *string `json:"maxmemory_policy,omitempty"`
	MaxmemoryClients *string `json:"maxmemory_clients,omitempty"`
	TLS              *string `json:"tls,omitempty"`
}

// Empty reports whether s changes nothing.
func (s Settings) Empty() bool {
	return s.MaxmemoryPolicy == nil && s.MaxmemoryClients == nil && s.TLS == nil
}

// IOSetting is an instance's own IO limits (Spec.IO, Resize.IO) on the
// block device of the agent's data directory: each field that is set
// replaces the agent's default (--io-read-bps, ...), and 0 is no limit.
// A limit is at least MinIOBPS bytes or MinIOPS operations a second.
type IOSetting struct {
	// ReadBPS and WriteBPS are bytes a second.
	ReadBPS  *int64 `json:"read_bps,omitempty"`
	WriteBPS *int64 `json:"write_bps,omitempty"`
	// ReadIOPS and WriteIOPS are operations a second.
	ReadIOPS  *int64 `json:"read_iops,omitempty"`
	WriteIOPS *int64 `json:"write_iops,omitempty"`
	// Weight is the instance's share of the device under contention,
	// 1-1000 (everyone's default is 100); only the BFQ scheduler uses it.
	Weight *int64 `json:"weight,omitempty"`
}

// Bounds of an IO limit: below these an instance could not even load its
// data in the ready timeout.
const (
	MinIOBPS    = 1 << 20
	MinIOPS     = 10
	MaxIOWeight = 1000
)

// IOLimits are the IO limits that apply to an instance (Instance.IO).
type IOLimits struct {
	// Device is the block device they are set on ("254:0", the whole
	// disk of the data directory's partition); empty when there is none
	// (tmpfs, NFS), and then Note says why and nothing is throttled.
	Device string `json:"device,omitempty"`
	// ReadBPS, WriteBPS (bytes a second), ReadIOPS and WriteIOPS
	// (operations a second); 0 is no limit.
	ReadBPS   int64 `json:"read_bps"`
	WriteBPS  int64 `json:"write_bps"`
	ReadIOPS  int64 `json:"read_iops"`
	WriteIOPS int64 `json:"write_iops"`
	// Weight is 0 when left at the default.
	Weight int64 `json:"weight,omitempty"`
	// Setting is the instance's own setting; what it does not set is the
	// agent's default.
	Setting *IOSetting `json:"setting,omitempty"`
	// Note says why the limits are not enforced, or what they cover.
	Note string `json:"note,omitempty"`
}

// Primary is where a move's target replicates from and how it logs in
// there: the answer of POST /v1/instances/{id}/move on the source, and
// Spec.ReplicaOf on the target.
type Primary struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	User     string `json:"user"`
	Password string `json:"password"`
	// TLS says Port is the source's TLS port: the replica links over TLS
	// (the source has TLS on), verifying the source against CACert, the
	// PEM certificate of the source agent's CA. The target then needs TLS
	// on too.
	TLS    bool   `json:"tls,omitempty"`
	CACert string `json:"ca_cert,omitempty"`
}

// Replication is GET /v1/instances/{id}/replication.
type Replication struct {
	// Role is "master" or "replica".
	Role string `json:"role"`
	// Offset is a primary's replication offset, or how far a replica has
	// processed its primary's.
	Offset int64 `json:"offset"`
	// LinkUp and SyncInProgress are a replica's link to its primary.
	LinkUp         bool `json:"link_up"`
	SyncInProgress bool `json:"sync_in_progress"`
	// Replicas is how many replicas a primary has.
	Replicas int `json:"replicas"`
	// Persisted is false while the server still writes its data to disk
	// the first time (an AOF replica's rewrite after its sync): a move
	// cuts over only once its target has.
	Persisted bool `json:"persisted"`
}

// Cutover is the body of POST /v1/instances/{id}/move/cutover, and
// Offset its answer's: the source pauses writes for at most TimeoutMS,
// fences its tenants off, and says its final replication offset.
type Cutover struct {
	TimeoutMS int   `json:"timeout_ms"`
	Offset    int64 `json:"offset"`
}

// Promote is the body of POST /v1/instances/{id}/promote on a move's
// target: it waits at most TimeoutMS until it has processed Offset of its
// primary's stream, then becomes a primary.
type Promote struct {
	Offset    int64 `json:"offset"`
	TimeoutMS int   `json:"timeout_ms"`
}

// Forward is the body of POST /v1/instances/{id}/move/forward on a move's
// source: its redis-server goes and a forwarder to Host:Port holds its
// port for TTLSeconds, after which the instance is deleted.
type Forward struct {
	Host       string `json:"host"`
	Port       int    `json:"port"`
	TTLSeconds int    `json:"ttl_seconds"`
}

// MaxMetadataBytes bounds an instance's metadata (compacted JSON).
const MaxMetadataBytes = 8 << 10

// Resize is the body of PATCH /v1/instances/{id}: a new maxmemory, new
// settings, IO limits, new metadata, or any of them together. IO replaces
// the instance's whole IO setting ({} is the agent's defaults again).
type Resize struct {
	MemoryMB *int       `json:"memory_mb,omitempty"`
	IO       *IOSetting `json:"io,omitempty"`
	Settings
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// Backup, when set, replaces the instance's backup settings (an empty
	// object: the agent's defaults again). It applies at once.
	Backup *BackupPolicy `json:"backup,omitempty"`
}

// BackupPolicy is an instance's backup settings; what is left out is the
// agent's default (--backup-schedule, --backup-keep, --backup-keep-days).
type BackupPolicy struct {
	// Schedule is "off" (no scheduled backups; POST .../backups still
	// takes one), an interval as a Go duration ("6h", at least 1s), or a
	// daily window in UTC ("daily 02:00-04:00"). Instances are spread
	// over the interval or the window by their id, each at the same point
	// of it every time.
	Schedule string `json:"schedule,omitempty"`
	// Keep is how many backups to keep (0: no limit by count); KeepDays
	// how many days (0: no limit by age). A backup beyond either goes,
	// after a backup succeeded; the newest one always stays.
	Keep     *int `json:"keep,omitempty"`
	KeepDays *int `json:"keep_days,omitempty"`
}

// Backup is one backup in the bucket (POST and GET
// /v1/instances/{id}/backups).
type Backup struct {
	// Key is the object's key: <prefix>/<instance id>/<time>.rdb. A restore
	// names it (PUT /v1/instances/{id}/snapshot?from_backup=<key>).
	Key      string    `json:"key"`
	Instance string    `json:"instance"`
	Time     time.Time `json:"time"`
	Size     int64     `json:"size"`
	// The rest is the object's metadata: filled in by POST, by GET with
	// ?details=true and in GET /v1/backups.
	SHA256       string `json:"sha256,omitempty"`
	RedisVersion string `json:"redis_version,omitempty"`
	// Agent names the agent that took it (--backup-agent-name).
	Agent string `json:"agent,omitempty"`
	// AgeSeconds is how old it was when listed: the data a restore of it
	// loses.
	AgeSeconds float64 `json:"age_seconds"`
	// The manifest, in GET /v1/backups: what it takes to recreate the
	// instance elsewhere.
	MemoryMB    int             `json:"memory_mb,omitempty"`
	Persistence string          `json:"persistence,omitempty"`
	Metadata    json.RawMessage `json:"metadata,omitempty"`
	Bindings    []BackupBinding `json:"bindings,omitempty"`
	// MaxmemoryPolicy, MaxmemoryClients and TLS are the instance's
	// settings (Spec's), in the manifest.
	MaxmemoryPolicy  string `json:"maxmemory_policy,omitempty"`
	MaxmemoryClients string `json:"maxmemory_clients,omitempty"`
	TLS              string `json:"tls,omitempty"`
}

// BackupBinding is a binding as a backup's manifest keeps it.
type BackupBinding struct {
	ID       string `json:"id"`
	Username string `json:"username"`
	Password string `json:"password"`
}

// BackupList is the body of GET /v1/instances/{id}/backups (oldest first)
// and GET /v1/backups (each instance's latest).
type BackupList struct {
	Backups []Backup `json:"backups"`
}

// BackupStatus is an instance's backups as its view shows them.
type BackupStatus struct {
	// Schedule, Keep and KeepDays are in force (the instance's own, else
	// the agent's).
	Schedule string `json:"schedule"`
	Keep     int    `json:"keep"`
	KeepDays int    `json:"keep_days"`
	// Last is the last successful backup this agent took.
	Last *Backup `json:"last,omitempty"`
	// LastError is why the last backup failed, when it did after Last.
	LastError   string     `json:"last_error,omitempty"`
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
	// NextAt is when the next scheduled one is due.
	NextAt  *time.Time `json:"next_at,omitempty"`
	Running bool       `json:"running,omitempty"`
}

// RestoreRequest is the JSON body a restore from a backup may have
// (PUT /v1/instances/{id}/snapshot, Content-Type application/json).
type RestoreRequest struct {
	FromBackup string `json:"from_backup"`
}

// BindRequest is the optional body of PUT /v1/instances/{id}/bindings/{bid}.
type BindRequest struct {
	// Password, when set, is the binding's password instead of a new
	// random one: a move to another agent keeps the application's
	// credentials. At least MinPasswordBytes of printable ASCII, no
	// spaces.
	Password string `json:"password,omitempty"`
}

// MinPasswordBytes is the shortest password a BindRequest may set.
const MinPasswordBytes = 16

// Exit describes how a redis-server process ended.
type Exit struct {
	// Time the exit was noticed.
	Time time.Time `json:"time"`
	// Code is the exit status when the process exited by itself, else -1.
	Code int `json:"code"`
	// Signal names the signal that killed the process ("killed", ...), or "".
	Signal string `json:"signal,omitempty"`
	// Reason is why the agent thinks it ended: one of the Reason* values.
	Reason string `json:"reason"`
	// Message says more where the reason alone does not (why a spawn
	// failed).
	Message string `json:"message,omitempty"`
}

// Exit reasons.
const (
	ReasonCrash       = "crash"        // it exited or was killed by something else
	ReasonUnready     = "unready"      // it did not answer within the ready timeout
	ReasonManual      = "manual"       // a restart was asked for (or applies an ACL change)
	ReasonStopped     = "stopped"      // it was stopped for a delete
	ReasonHung        = "hung"         // it stopped answering and was replaced
	ReasonOOM         = "oom"          // its cgroup's memory limit killed it
	ReasonSpawnFailed = "spawn_failed" // it could not be started at all
)

// Instance states, as GET /v1/instances shows them.
const (
	StateStarting  = "starting"  // spawned, not yet answering
	StateRunning   = "running"   // answers
	StateBackoff   = "backoff"   // exited; waiting to start again
	StateCrashloop = "crashloop" // repeated fast failures; still retrying
	StateStopping  = "stopping"  // being deleted or restarted
	StateStopped   = "stopped"   // no process is supervised
)

// Instance is the view of one instance (GET /v1/instances/{id}).
type Instance struct {
	ID          string `json:"id"`
	State       string `json:"state"`
	MemoryMB    int    `json:"memory_mb"`
	Persistence string `json:"persistence"`
	Host        string `json:"host"`
	// Port is the plain port; it does not listen while TLS is required.
	Port int `json:"port"`
	// MaxmemoryPolicy, MaxmemoryClients and TLS are the instance's
	// settings (Spec's), defaults filled in.
	MaxmemoryPolicy  string `json:"maxmemory_policy"`
	MaxmemoryClients string `json:"maxmemory_clients"`
	TLS              string `json:"tls"`
	// TLSPort is the TLS port while TLS is optional or required.
	TLSPort int `json:"tls_port,omitempty"`
	PID     int `json:"pid,omitempty"`
	// UID is the uid and gid of the instance's own Redis user; 0 when it
	// runs as the shared one.
	UID       int       `json:"uid,omitempty"`
	CreatedAt time.Time `json:"created_at"`
	// UptimeSeconds is how long the current process has run; 0 when none runs.
	UptimeSeconds float64 `json:"uptime_seconds"`
	// Restarts counts the restarts of the process since the instance was created.
	Restarts int `json:"restarts"`
	// MemoryUsedBytes (INFO used_memory) and RSSBytes (the process's
	// resident memory) come from the last health check; 0 before one.
	MemoryUsedBytes int64    `json:"memory_used_bytes,omitempty"`
	RSSBytes        int64    `json:"rss_bytes,omitempty"`
	LastExit        *Exit    `json:"last_exit,omitempty"`
	Bindings        []string `json:"bindings"`
	// Binary is the redis-server executable the instance runs (or will
	// run at its next start).
	Binary string `json:"binary,omitempty"`
	// LogTail holds the last lines of the redis-server log while the
	// instance is not running: why it does not start.
	LogTail []string `json:"log_tail,omitempty"`
	// Metadata is what the provision (or a later PATCH) stored.
	Metadata json.RawMessage `json:"metadata,omitempty"`
	// RedisVersion is the version of the redis-server the instance runs,
	// when the agent knows it ("7.0.15").
	RedisVersion string `json:"redis_version,omitempty"`
	// Move is the source's side of a move in progress: its state
	// (replicating, cutover, forwarding) and, once forwarding, where to.
	Move *MoveStatus `json:"move,omitempty"`
	// ReplicaOf is set on a move's target until it is promoted.
	ReplicaOf string `json:"replica_of,omitempty"`
	// Backup is the instance's backups, on an agent with a backup target.
	Backup *BackupStatus `json:"backup,omitempty"`
	// IO is the IO limits that apply to it.
	IO *IOLimits `json:"io,omitempty"`
	// Disk is what its files take and may take.
	Disk *DiskUsage `json:"disk,omitempty"`
}

// DiskUsage is what an instance's files take on disk (allocated bytes, as
// du counts them), measured in the background every --disk-interval, and
// what they may take.
type DiskUsage struct {
	// DataBytes is its directory: data (RDB, AOF), config, a restore's
	// staging. LogBytes is its log and the rotated ones.
	DataBytes int64 `json:"data_bytes"`
	LogBytes  int64 `json:"log_bytes"`
	// ReservedBytes is its share of the disk budget: its files' worst
	// case for its maxmemory and persistence (3 x maxmemory + 64 MiB for
	// the aof modes, 2 x for rdb), 1 MiB for its directory, and its logs'
	// bound when they are on the data file system.
	ReservedBytes int64 `json:"reserved_bytes"`
	// QuotaBytes is the project quota on its data directory, where the
	// file system enforces one: writes beyond it fail (ENOSPC) for it
	// alone. 0 when there is none.
	QuotaBytes int64 `json:"quota_bytes,omitempty"`
	// MeasuredAt is when DataBytes and LogBytes were measured; absent
	// before the first measure.
	MeasuredAt time.Time `json:"measured_at,omitzero"`
}

// MoveStatus is the source's side of a move, in the instance's view.
type MoveStatus struct {
	State string `json:"state"`
	// StartedAt is when the move began on the source, CutoverAt when its
	// cutover did (zero before).
	StartedAt time.Time `json:"started_at"`
	CutoverAt time.Time `json:"cutover_at,omitzero"`
	ForwardTo string    `json:"forward_to,omitempty"`
	// Forwarded counts the connections the forwarder holds now.
	Forwarded int64 `json:"forwarded,omitempty"`
}

// StateForwarding is the state of a moved instance whose old port
// forwards to its new place.
const StateForwarding = "forwarding"

// InstanceList is the body of GET /v1/instances.
type InstanceList struct {
	Instances []Instance `json:"instances"`
}

// Orphan is something on the machine that looks like an instance's but
// that no record owns. The agent reports orphans and never deletes them.
type Orphan struct {
	// Kind is "directory" or "process".
	Kind string `json:"kind"`
	ID   string `json:"id"`
	Path string `json:"path"`
	PID  int    `json:"pid,omitempty"`
}

// OrphanList is the body of GET /v1/orphans.
type OrphanList struct {
	Orphans []Orphan `json:"orphans"`
}

// Credentials are what a binding hands to the application
// (PUT /v1/instances/{id}/bindings/{bid}).
//
// Port and URI are what a client connects to: the plain port and a
// redis:// URI, or, when the instance requires TLS, the TLS port and a
// rediss:// URI. With TLS optional or required, TLSPort, TLSURI (always
// rediss://) and CACert (the PEM certificate of the CA that signed the
// instance's certificate, for the client to verify it) are set too.
type Credentials struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	Username string `json:"username"`
	Password string `json:"password"`
	URI      string `json:"uri"`
	TLSPort  int    `json:"tls_port,omitempty"`
	TLSURI   string `json:"tls_uri,omitempty"`
	CACert   string `json:"ca_cert,omitempty"`
}

// Capacity is what a broker needs to place the next instance on this VM
// (GET /v1/capacity). The memory reserved is the records' memory_mb and
// that of the restores' candidates running (each its instance's memory_mb).
type Capacity struct {
	Instances        int `json:"instances"`
	PortsTotal       int `json:"ports_total"`
	PortsFree        int `json:"ports_free"`
	MemoryTotalMB    int `json:"memory_total_mb"`
	MemoryReservedMB int `json:"memory_reserved_mb"`
	MemoryFreeMB     int `json:"memory_free_mb"`
	// RedisVersion is the version of the configured redis-server, the one
	// new instances run.
	RedisVersion string `json:"redis_version"`
	// Draining is the brokers' mark (PUT /v1/drain): nothing new is to be
	// placed here. Kept by the agent so that every broker sees it.
	Draining bool `json:"draining"`
	// BackupAgent is the name this agent puts in its backups
	// (--backup-agent-name), "" without a backup target: a broker finds a
	// lost agent's instances in the bucket by it.
	BackupAgent string `json:"backup_agent,omitempty"`
	// The data directory's file system: its size, and what an
	// unprivileged user may still write there.
	DiskTotalBytes int64 `json:"disk_total_bytes"`
	DiskFreeBytes  int64 `json:"disk_free_bytes"`
	// DiskReservedBytes sums the instances' reservations
	// (DiskUsage.ReservedBytes), DiskUsedBytes what their files take now.
	DiskReservedBytes int64 `json:"disk_reserved_bytes"`
	DiskUsedBytes     int64 `json:"disk_used_bytes"`
	// DiskAvailableBytes is the free space less what the instances may
	// still grow into (each reservation beyond its use) and the agent's
	// headroom: the largest reservation a new instance (or a resize) can
	// get; beyond it a provision is a 507.
	DiskAvailableBytes int64 `json:"disk_available_bytes"`
	// DiskOverheadBytes is what each instance reserves besides its data
	// files (DataFilesBytes): its directory, and its logs' bound when they
	// are on the data file system. DiskBudgetOff says the agent does not
	// hold provisions to the disk budget (--disk-budget off).
	DiskOverheadBytes int64 `json:"disk_overhead_bytes"`
	DiskBudgetOff     bool  `json:"disk_budget_off,omitempty"`
}

// DiskNeed is the disk reservation an instance of memoryMB and
// persistence gets on the agent whose capacity c is: what a provision of
// it needs of DiskAvailableBytes.
func (c Capacity) DiskNeed(memoryMB int, persistence string) int64 {
	return DataFilesBytes(memoryMB, persistence) + c.DiskOverheadBytes
}

// DiskFits reports whether the agent whose capacity c is has the disk for
// a reservation that grows by need: it does not hold provisions to its
// disk budget, it reported no disk (an agent older than the budget), or
// need fits in DiskAvailableBytes.
func (c Capacity) DiskFits(need int64) bool {
	return c.DiskBudgetOff || c.DiskTotalBytes == 0 || need <= c.DiskAvailableBytes
}

// DataFilesBytes is the most an instance's data files take, the bound its
// disk reservation is made of: for the aof modes ("" is aof) the AOF
// grows to twice its base before Redis rewrites it (or to
// auto-aof-rewrite-min-size, 64 MiB), plus the rewrite's new base; for
// rdb a dump and the one a BGSAVE writes beside it; nothing without
// persistence. A data set's files are smaller than its maxmemory (an RDB
// is compact, an AOF base is one), so these bound them.
func DataFilesBytes(memoryMB int, persistence string) int64 {
	mb := int64(memoryMB) << 20
	switch {
	case persistence == "" || IsAOF(persistence):
		return 3*mb + 64<<20
	case persistence == PersistenceRDB:
		return 2 * mb
	}
	return 0
}

// LogLines is the body of GET /v1/instances/{id}/log.
type LogLines struct {
	ID    string   `json:"id"`
	Lines []string `json:"lines"`
}

// Status is the body of /healthz and /readyz when they pass.
type Status struct {
	Status string `json:"status"`
	// Details are what /readyz adds: the isolation the agent cannot give
	// on this host (no Landlock, no user per instance, no IO limits, no
	// disk quotas, ...).
	Details []string `json:"details,omitempty"`
}

// RolloutRequest is the optional body of POST /v1/rollout.
type RolloutRequest struct {
	// Instances, when set, limits the rollout to these instances.
	Instances []string `json:"instances,omitempty"`
}

// Rollout states.
const (
	RolloutIdle    = "idle"    // none has run since the agent started
	RolloutRunning = "running" // moving instances, one at a time
	RolloutDone    = "done"    // every instance runs the configured binary
	RolloutFailed  = "failed"  // an instance did not start on it; the rest wait
)

// Rollout is the progress of moving instances to the configured
// redis-server binary (GET and POST /v1/rollout).
type Rollout struct {
	State string `json:"state"`
	// Binary and Version are the configured redis-server: the target.
	Binary  string `json:"binary"`
	Version string `json:"version"`
	// Total is how many instances the rollout set out to move, Moved how
	// many it has moved.
	Total int `json:"total"`
	Moved int `json:"moved"`
	// Pending counts the instances not on the target binary now.
	Pending int `json:"pending"`
	// Current is the instance being moved.
	Current string `json:"current,omitempty"`
	// FailedInstance did not become ready on the target binary and runs on
	// its old one again; Error says why.
	FailedInstance string `json:"failed_instance,omitempty"`
	Error          string `json:"error,omitempty"`
	// MaxUnavailableSeconds is the longest time one instance was down
	// (graceful shutdown to ready on the new binary) in this rollout.
	MaxUnavailableSeconds float64    `json:"max_unavailable_seconds"`
	StartedAt             *time.Time `json:"started_at,omitempty"`
	FinishedAt            *time.Time `json:"finished_at,omitempty"`
}

// Error is the body of every error response.
type Error struct {
	// Code is a stable, machine-readable name: one of the Code* values.
	Code string `json:"error"`
	// Description is a sentence for humans.
	Description string `json:"description"`
}

// Error codes.
const (
	CodeBadRequest           = "BadRequest"           // 400: malformed body, path or query
	CodeUnauthorized         = "Unauthorized"         // 401
	CodeNotFound             = "NotFound"             // 404
	CodeMethodNotAllowed     = "MethodNotAllowed"     // 405
	CodeConflict             = "Conflict"             // 409
	CodeGone                 = "Gone"                 // 410: a DELETE of what is absent
	CodeTooLarge             = "TooLarge"             // 413
	CodeUnsupportedMediaType = "UnsupportedMediaType" // 415
	CodeInvalid              = "Invalid"              // 422
	CodeInternal             = "Internal"             // 500
	CodeBackupStorage        = "BackupStorage"        // 502: the backup bucket failed or refused
	CodeNotReady             = "NotReady"             // 503: the instance, or the agent, is not ready
	CodeNotAlive             = "NotAlive"             // 503: the agent's main loop stalls
	CodeBusy                 = "Busy"                 // 503 with Retry-After
	CodeInsufficientCapacity = "InsufficientCapacity" // 507
)

// Header names.
const (
	// SnapshotSHA256Header carries the hex sha256 of a snapshot: set on a
	// snapshot out, checked on a restore in when given.
	SnapshotSHA256Header = "X-Snapshot-Sha256"
	// RetryAfterHeader says, in seconds, when a Busy request may be tried
	// again.
	RetryAfterHeader = "Retry-After"
)
