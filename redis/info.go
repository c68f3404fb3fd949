package redis

import (
	"context"
	"errors"
	"strconv"
	"strings"
)

// Info holds the INFO figures the agent exports, named after
// oliver006/redis_exporter's metrics so its dashboards carry over.
type Info struct {
	UptimeSeconds     float64
	UsedMemory        float64
	MaxMemory         float64
	ConnectedClients  float64
	BlockedClients    float64
	CommandsProcessed float64
	KeyspaceHits      float64
	KeyspaceMisses    float64
	EvictedKeys       float64
	ExpiredKeys       float64
	// DBKeys is the number of keys by database ("db0", ...).
	DBKeys map[string]float64
	// RDBLastBgsaveOK and AOFLastWriteOK are the rdb_last_bgsave_status
	// and aof_last_write_status fields.
	RDBLastBgsaveOK bool
	AOFLastWriteOK  bool
	// Loading is set while the server loads its data set.
	Loading bool
	// MaxmemoryPolicy is the server's eviction policy.
	MaxmemoryPolicy string
}

// infoArgs asks for the sections the agent exports, not the default set
// (replication, cpu, errorstats, cluster ... are not read).
var infoArgs = []string{"INFO", "server", "clients", "memory", "persistence", "stats", "keyspace"}

// Info reads INFO on the control connection. While the server runs a
// script past busy-reply-threshold the error has Busy() true; INFO itself
// is answered while loading.
func (a *Admin) Info(ctx context.Context) (Info, error) {
	r, err := a.Do(ctx, infoArgs...)
	if err != nil {
		return Info{}, a.orHeld(err)
	}
	return ParseInfo(r.Str)
}

// ParseInfo reads the text of an INFO reply.
func ParseInfo(text string) (Info, error) {
	in := Info{DBKeys: map[string]float64{}}
	seen := false
	eachField(text, func(k, v string) {
		seen = true
		num := func() float64 { f, _ := strconv.ParseFloat(v, 64); return f }
		switch k {
		case "uptime_in_seconds":
			in.UptimeSeconds = num()
		case "used_memory":
			in.UsedMemory = num()
		case "maxmemory":
			in.MaxMemory = num()
		case "maxmemory_policy":
			in.MaxmemoryPolicy = v
		case "connected_clients":
			in.ConnectedClients = num()
		case "blocked_clients":
			in.BlockedClients = num()
		case "total_commands_processed":
			in.CommandsProcessed = num()
		case "keyspace_hits":
			in.KeyspaceHits = num()
		case "keyspace_misses":
			in.KeyspaceMisses = num()
		case "evicted_keys":
			in.EvictedKeys = num()
		case "expired_keys":
			in.ExpiredKeys = num()
		case "rdb_last_bgsave_status":
			in.RDBLastBgsaveOK = v == "ok"
		case "aof_last_write_status":
			in.AOFLastWriteOK = v == "ok"
		case "loading":
			in.Loading = v == "1"
		default:
			// db0:keys=1,expires=0,avg_ttl=0
			if strings.HasPrefix(k, "db") {
				for _, kv := range strings.Split(v, ",") {
					if n, ok := strings.CutPrefix(kv, "keys="); ok {
						f, _ := strconv.ParseFloat(n, 64)
						in.DBKeys[k] = f
					}
				}
			}
		}
	})
	if !seen {
		return in, errors.New("INFO: no fields")
	}
	return in, nil
}

// eachField calls fn with the key and value of every "key:value" line of
// an INFO reply, skipping section headers ("# Memory") and blank lines.
func eachField(text string, fn func(k, v string)) {
	for _, line := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(strings.TrimRight(line, "\r"), ":"); ok && !strings.HasPrefix(k, "#") {
			fn(k, v)
		}
	}
}
