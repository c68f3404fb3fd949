package agent

// Fault-injection points: named places inside the operations where a test
// build (go build -tags faultinject) kills the agent with SIGKILL when
// REDIS_AGENT_CRASH_AT names the point. A normal build compiles crashAt to
// nothing. The crash-consistency test loops over FaultPoints.
const (
	FaultProvisionRecorded = "provision.recorded" // record written, nothing on disk
	FaultProvisionFiles    = "provision.files"    // directory and config written, no process
	FaultSpawnUnrecorded   = "spawn.unrecorded"   // process spawned, its pid not yet persisted
	FaultProvisionReady    = "provision.ready"    // process ready, record still provisioning
	FaultDeleteMarked      = "delete.marked"      // record marked deleting, process running
	FaultDeleteStopped     = "delete.stopped"     // process stopped, files still there
	FaultDeleteRemoved     = "delete.removed"     // files removed, record still there
	FaultBindRecorded      = "bind.recorded"      // binding in the record, not yet in Redis
	FaultUnbindRecorded    = "unbind.recorded"    // binding gone from the record, still in Redis
	FaultRestoreStaged     = "restore.staged"     // new data received and staged, no candidate yet, old data live
	FaultRestoreLoaded     = "restore.loaded"     // the candidate loaded the staged data and runs beside the old process
	FaultRestoreSwapped    = "restore.swapped"    // old process stopped, data directories swapped, the candidate not yet on the ports
	FaultBackupUploaded    = "backup.uploaded"    // a backup's RDB in the bucket, its manifest and record not yet
)

// Fault-injection points of a replication move (MoveFaultPoints).
const (
	FaultMoveStarted         = "move.started"          // source: replication user recorded, not yet in Redis
	FaultMoveCutover         = "move.cutover"          // source: cutover recorded, writes not yet paused
	FaultMoveForwardRecorded = "move.forward.recorded" // source: forwarding recorded, redis-server still running
	FaultPromoteRecorded     = "promote.recorded"      // target: primary recorded and configured, still a replica live
)

// MoveFaultPoints lists the fault-injection points of a move.
var MoveFaultPoints = []string{FaultMoveStarted, FaultMoveCutover, FaultMoveForwardRecorded, FaultPromoteRecorded}

// FaultPoints lists every fault-injection point of the single-agent
// operations.
var FaultPoints = []string{
	FaultProvisionRecorded, FaultProvisionFiles, FaultSpawnUnrecorded, FaultProvisionReady,
	FaultDeleteMarked, FaultDeleteStopped, FaultDeleteRemoved,
	FaultBindRecorded, FaultUnbindRecorded,
	FaultRestoreLoaded, FaultRestoreStaged, FaultRestoreSwapped,
}
