package redis

import (
	"context"
	"fmt"
	"strconv"
	"time"
)

// Replication is what INFO replication says of a server.
type Replication struct {
	// Role is "master" or "slave".
	Role string
	// MasterReplOffset is the server's own replication offset.
	MasterReplOffset int64
	// SlaveReplOffset (a replica) is how far it has processed its
	// primary's stream; MasterLinkUp whether its link is up, and
	// SyncInProgress whether the initial sync still runs.
	SlaveReplOffset int64
	MasterLinkUp    bool
	SyncInProgress  bool
	// ConnectedSlaves (a primary) counts its replicas.
	ConnectedSlaves int
	// AOFRewriting is set while an AOF rewrite runs or is scheduled (a
	// replica's first AOF after its sync).
	AOFRewriting bool
}

// Replication reads INFO replication.
func (a *Admin) Replication(ctx context.Context) (Replication, error) {
	f, err := a.Fields(ctx, "replication")
	if err != nil {
		return Replication{}, err
	}
	n := func(k string) int64 { v, _ := strconv.ParseInt(f[k], 10, 64); return v }
	p, err := a.Fields(ctx, "persistence")
	if err != nil {
		return Replication{}, err
	}
	return Replication{
		AOFRewriting:     p["aof_rewrite_in_progress"] == "1" || p["aof_rewrite_scheduled"] == "1",
		Role:             f["role"],
		MasterReplOffset: n("master_repl_offset"),
		SlaveReplOffset:  n("slave_repl_offset"),
		MasterLinkUp:     f["master_link_status"] == "up",
		SyncInProgress:   f["master_sync_in_progress"] == "1",
		ConnectedSlaves:  int(n("connected_slaves")),
	}, nil
}

// PauseWrites stops the server from running write commands for d (reads
// go on; writers block until the pause ends), and returns its replication
// offset once paused: with no writes, it stays there, and a replica that
// reaches it holds every write the server acknowledged.
func (a *Admin) PauseWrites(ctx context.Context, d time.Duration) (offset int64, err error) {
	if _, err := a.Do(ctx, "CLIENT", "PAUSE", strconv.FormatInt(d.Milliseconds(), 10), "WRITE"); err != nil {
		return 0, fmt.Errorf("CLIENT PAUSE: %w", err)
	}
	r, err := a.Replication(ctx)
	if err != nil {
		return 0, err
	}
	return r.MasterReplOffset, nil
}

// Unpause ends a pause.
func (a *Admin) Unpause(ctx context.Context) error {
	if _, err := a.Do(ctx, "CLIENT", "UNPAUSE"); err != nil {
		return fmt.Errorf("CLIENT UNPAUSE: %w", err)
	}
	return nil
}

// Promote makes a replica a primary of its own (REPLICAOF NO ONE); it
// keeps its data set.
func (a *Admin) Promote(ctx context.Context) error {
	if _, err := a.Do(ctx, "REPLICAOF", "NO", "ONE"); err != nil {
		return fmt.Errorf("REPLICAOF NO ONE: %w", err)
	}
	return nil
}

// KillUser closes every connection of ACL user name.
func (a *Admin) KillUser(ctx context.Context, name string) error {
	if _, err := a.Do(ctx, "CLIENT", "KILL", "USER", name); err != nil {
		if se, ok := err.(ServerError); ok && se.Msg == "ERR No such user '"+name+"'" {
			return nil
		}
		return fmt.Errorf("CLIENT KILL USER %s: %w", name, err)
	}
	return nil
}
