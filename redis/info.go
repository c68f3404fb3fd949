package redis

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
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
}

// infoCommand asks for the sections the agent exports, not the default
// set (replication, cpu, errorstats, cluster ... are not read).
var infoCommand = command("INFO", "server", "clients", "memory", "persistence", "stats", "keyspace")

// healthConn is the connection the periodic INFO reuses, logged in as the
// admin user. Any error drops it; the next call dials again.
type healthConn struct {
	c net.Conn
	r *bufio.Reader
}

// Info reads INFO on a connection kept between calls (dialled and
// authenticated again after any error). While the server runs a script
// past busy-reply-threshold the error has Busy() true; INFO itself is
// answered while loading.
func (a *Admin) Info(ctx context.Context) (Info, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	reused := a.health != nil
	in, err := a.info(ctx)
	if err != nil && reused && !isBusy(err) && ctx.Err() == nil {
		// The kept connection may have died with an earlier process
		// (a restart); that is not this process's failure.
		return a.info(ctx)
	}
	return in, err
}

func (a *Admin) info(ctx context.Context) (in Info, err error) {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(2 * time.Second)
	}
	hc := a.health
	req := infoCommand
	if hc == nil {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", a.addr)
		if err != nil {
			return Info{}, err
		}
		hc = &healthConn{c: c, r: bufio.NewReaderSize(c, 1024)}
		req = append(command("AUTH", a.user, a.secret), infoCommand...)
	}
	a.health = nil
	defer func() {
		if err == nil || isBusy(err) {
			a.health = hc // the connection is in a known state: keep it
		} else {
			hc.c.Close()
		}
	}()
	hc.c.SetDeadline(deadline)
	if _, err := hc.c.Write(req); err != nil {
		return Info{}, err
	}
	r := hc.r
	var line string
	if len(req) != len(infoCommand) {
		line, err = r.ReadString('\n')
		if err != nil {
			return Info{}, fmt.Errorf("read AUTH reply: %w", err)
		}
		if strings.TrimRight(line, "\r\n") != "+OK" {
			return Info{}, fmt.Errorf("AUTH: %s", strings.TrimSpace(line))
		}
	}
	line, err = r.ReadString('\n')
	if err != nil {
		return Info{}, fmt.Errorf("read INFO reply: %w", err)
	}
	line = strings.TrimRight(line, "\r\n")
	if strings.HasPrefix(line, "-BUSY") {
		return Info{}, busyError{line[1:]}
	}
	if !strings.HasPrefix(line, "$") {
		return Info{}, fmt.Errorf("INFO: unexpected reply %q", line)
	}
	n, err := strconv.Atoi(line[1:])
	if err != nil || n < 0 || n > 1<<20 {
		return Info{}, fmt.Errorf("INFO: bad length %q", line)
	}
	body := make([]byte, n+2)
	if _, err := io.ReadFull(r, body); err != nil {
		return Info{}, fmt.Errorf("read INFO body: %w", err)
	}
	return ParseInfo(string(body[:n]))
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
