package agent

import (
	"errors"
	"time"
)

// Sentinel errors of the Service. Every error a Service method returns wraps
// at most one of them (matched with errors.Is); the API maps each to one HTTP
// status in one place. An error that wraps none of them is the agent's fault.
var (
	// ErrNotFound: the instance or binding does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the id exists with a different spec, or the instance is in
	// a state that does not allow the operation.
	ErrConflict = errors.New("conflict")
	// ErrInvalid: the request is well formed but its content is not valid
	// (bad id, unknown persistence mode, memory out of bounds).
	ErrInvalid = errors.New("invalid")
	// ErrCapacity: no free port or not enough memory budget left.
	ErrCapacity = errors.New("no capacity")
	// ErrNotReady: the instance's new redis-server did not become ready
	// (it exited, or did not answer in time); the supervisor keeps
	// restarting it, and the instance's log_tail says why.
	ErrNotReady = errors.New("not ready")
)

// Persistence modes of an instance.
const (
	PersistenceAOF       = "aof"        // appendonly, appendfsync everysec (default)
	PersistenceAOFAlways = "aof-always" // appendonly, appendfsync always
	PersistenceRDB       = "rdb"        // RDB snapshots on the usual save points
	PersistenceNone      = "none"       // nothing is written to disk
)

// Spec is what the broker asks for when it provisions an instance.
type Spec struct {
	// MemoryMB is the instance's maxmemory in MiB; 0 means the agent's default.
	MemoryMB int `json:"memory_mb"`
	// Persistence is one of aof, aof-always, rdb, none; "" means aof.
	Persistence string `json:"persistence"`
}

// Exit describes how a redis-server process ended.
type Exit struct {
	// Time the exit was noticed.
	Time time.Time `json:"time"`
	// Code is the exit status when the process exited by itself, else -1.
	Code int `json:"code"`
	// Signal names the signal that killed the process ("killed", ...), or "".
	Signal string `json:"signal,omitempty"`
	// Reason is why the agent thinks it ended: crash, hung, stopped, unknown.
	Reason string `json:"reason"`
}

// Instance is the view of one instance the Service returns.
type Instance struct {
	ID          string    `json:"id"`
	State       string    `json:"state"`
	MemoryMB    int       `json:"memory_mb"`
	Persistence string    `json:"persistence"`
	Host        string    `json:"host"`
	Port        int       `json:"port"`
	PID         int       `json:"pid,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
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

// Credentials are what a binding hands to the application.
type Credentials struct {
	Host     string `json:"host"`
	Port     int    `json:"port"`
	Username string `json:"username"`
	Password string `json:"password"`
	URI      string `json:"uri"`
}

// Capacity is what a broker needs to place the next instance on this VM.
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
}
