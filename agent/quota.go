package agent

import (
	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/state"
)

// Per-instance disk quotas: where the data file system enforces project
// quotas (ext4 with the project and quota features, or XFS, mounted with
// prjquota), each instance's directory is a project of its own, its id
// the instance's uid (allocated at provision, kept on adoption, freed at
// delete), with a hard limit: an instance that outgrows it gets ENOSPC on
// its own writes (Redis: MISCONF for write commands) while its neighbours
// keep writing. Elsewhere a note says so once, and the alert
// RedisInstanceDiskOverReservation watches each instance's use against
// its reservation instead.

// initQuotas finds out whether the data file system enforces project
// quotas.
func (s *Service) initQuotas() {
	q, why := limits.ProbeQuotas(s.layout.DataRoot)
	if q == nil {
		s.quotaNote = "no per-instance disk quotas: " + why + "; one instance can fill the disk for all (the alert RedisInstanceDiskOverReservation watches each instance's use against its reservation)"
		s.log.Warn(s.quotaNote, "dir", s.layout.DataRoot)
		return
	}
	s.quota = q
	s.log.Info("a project quota per instance on the data file system", "fs", q.FSType, "dir", s.layout.DataRoot)
}

// project is the project id of rec's directory: its uid; 0 (none) for
// an instance without a user of its own, which gets its quota with its
// user at its next start.
func project(rec state.Instance) uint32 { return uint32(rec.UID) }

// quotaBytes is the hard limit of an instance's directory: its
// reservation's data part and room for the largest snapshot a restore
// takes (limits.MemoryFor), so that neither a snapshot out nor a restore
// of an instance within its reservation runs into it.
func (s *Service) quotaBytes(memoryMB int, persistence string) int64 {
	return apitype.DataFilesBytes(memoryMB, persistence) + dirOverhead + limits.MemoryFor(memoryMB)
}

// applyQuota puts rec's directory in its project and sets its limit. A
// failure is logged: the instance runs, without its quota, rather than
// not at all.
func (s *Service) applyQuota(rec state.Instance) {
	p := project(rec)
	if s.quota == nil || p == 0 {
		return
	}
	if err := limits.Assign(s.layout.Dir(rec.ID), p); err != nil {
		s.log.Error("cannot put the instance's directory in its quota project", "instance", rec.ID, "project", p, "err", err)
		return
	}
	if err := s.quota.SetLimit(p, s.quotaBytes(rec.MemoryMB, rec.Persistence)); err != nil {
		s.log.Error("cannot set the instance's disk quota", "instance", rec.ID, "project", p, "err", err)
	}
}

// clearQuota removes the limit of a deleted instance's project.
func (s *Service) clearQuota(rec state.Instance) {
	if p := project(rec); s.quota != nil && p != 0 {
		if err := s.quota.SetLimit(p, 0); err != nil {
			s.log.Warn("disk quota left behind", "instance", rec.ID, "project", p, "err", err)
		}
	}
}

// quotaFile puts a file bound for rec's directory (a restore's upload) in
// its project, which a rename into it requires.
func (s *Service) quotaFile(rec state.Instance, path string) error {
	if p := project(rec); s.quota != nil && p != 0 {
		return limits.SetProject(path, p)
	}
	return nil
}
