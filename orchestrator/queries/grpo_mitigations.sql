-- The GRPO mitigations table (report.html's "Zero-std prompts" section and the README's
-- GRPO table): per GRPO trial, the prompts at reward std 0 before training, their
-- gradient norm, the zero-std share while training, rollouts spent/refilled/saved, the
-- zero-std prediction's precision/recall, and the reward before/after (all prompts, and
-- those that started at std 0).  rlgrad query --sweep grpo_smollm2_arithmetic "$(cat orchestrator/queries/grpo_mitigations.sql)"
WITH first AS (SELECT trial, input_id, reward_mean AS r0, reward_std_zero AS zero0, grad_norm AS g0 FROM inputs WHERE step = 0),
last_step AS (SELECT trial, max(step) AS s FROM inputs GROUP BY trial),
final AS (SELECT i.trial, i.input_id, i.reward_mean AS rN, i.reward_std_zero AS zeroN
          FROM inputs i JOIN last_step l ON i.trial = l.trial AND i.step = l.s),
train AS (SELECT trial, avg(CASE WHEN metric = 'share_zero_std' THEN value END) AS zero_share,
                 sum(CASE WHEN metric = 'rollouts' THEN value END) AS rollouts,
                 sum(CASE WHEN metric = 'refill_rollouts' THEN value END) AS refills,
                 sum(CASE WHEN metric = 'rollouts_saved' THEN value END) AS saved,
                 arg_max(CASE WHEN metric = 'prediction_precision' THEN value END, step) AS precision,
                 arg_max(CASE WHEN metric = 'prediction_recall' THEN value END, step) AS recall
          FROM metrics WHERE split = 'train' GROUP BY trial)
SELECT t.stage, t.trial, t.params, count(*) AS prompts,
       sum(f.zero0::INT) AS std0_at_start,
       max(CASE WHEN f.zero0 THEN f.g0 END) AS max_grad_std0,
       min(CASE WHEN NOT f.zero0 THEN f.g0 END) AS min_grad_std_pos,
       round(any_value(tr.zero_share), 3) AS train_zero_std_share,
       any_value(tr.rollouts) AS rollouts, any_value(tr.refills) AS refills, any_value(tr.saved) AS saved,
       any_value(tr.precision) AS precision, any_value(tr.recall) AS recall,
       round(avg(f.r0), 3) AS reward_start, round(avg(fi.rN), 3) AS reward_end,
       round(avg(CASE WHEN f.zero0 THEN f.r0 END), 3) AS std0_reward_start,
       round(avg(CASE WHEN f.zero0 THEN fi.rN END), 3) AS std0_reward_end,
       sum(fi.zeroN::INT) AS std0_at_end
FROM first f JOIN final fi USING (trial, input_id) JOIN trials t ON t.trial = f.trial LEFT JOIN train tr ON tr.trial = f.trial
WHERE t.workload = 'grpo'
GROUP BY t.stage, t.trial, t.params ORDER BY t.stage, t.params
